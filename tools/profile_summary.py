"""Where the device time of a traced step goes: kernel time by kind and the costliest kernels.

    python tools/benchmark.py --exp=DiT_XL_Synthetic --profile prof/dit   # traces 3 steps
    python tools/profile_summary.py prof/dit [--steps 3] [--top 25]

Reads the perfetto_trace.json.gz that jax.profiler writes (the newest one under a directory, or
the file itself). On a GPU it sums the kernels of the device's stream lines; with no device
process in the trace (the CPU backend) it sums the XLA ops of the host's XLA thread-pool threads.
It prints the busy time per step (the union of kernel intervals, so concurrent streams are not
counted twice) against the span from the first kernel to the last, then the kernel time by kind
(matmul, attention, convolution, fusions, copies, collectives) and the top kernels by time. The
kinds are read off kernel names and are a guide, not an exact account.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys

# First match wins: attention kernels (cuDNN's flash kernels) and convolutions (implicit GEMMs)
# before the generic matmul pattern.
KINDS = (
    ('attention', re.compile(r'fmha|flash|sdpa|attention', re.I)),   # cuDNN's: '..._sdpa_...'
    ('collective', re.compile(r'nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all', re.I)),
    # not 'conv' alone: XLA's dtype conversions are 'loop_convert_fusion', 'wrapped_convert'
    ('convolution', re.compile(r'convolution|conv\d|conv_|implicit_?gemm|fprop|dgrad|wgrad', re.I)),
    ('matmul', re.compile(r'gemm|cublas|cutlass|xmma|nvjet|wgmma|sm\d+_|^dot|triton_gemm', re.I)),
    ('copy', re.compile(r'copy|transpose|memcpy|memset|dynamic.update.slice|dynamic.slice', re.I)),
    ('fusion', re.compile(r'fusion|loop_|input_|wrapped_|reduce|triton|elementwise', re.I)),
)
# Host-side bookkeeping and loop containers, which enclose the ops they run (CPU traces).
_CONTAINERS = re.compile(r'^(ThunkExecutor|ThreadpoolListener|while|conditional|call)\b')


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return 'other'


def find_trace(path: str) -> str:
  """The trace file itself, or the newest perfetto_trace.json.gz under a directory."""
  if os.path.isfile(path):
    return path
  found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files
           if f.endswith('perfetto_trace.json.gz')]
  if not found:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {path}: trace with '
                            f'`tools/benchmark.py --profile {path}` (or jax.profiler.trace(..., '
                            'create_perfetto_trace=True))')
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def kernel_events(events: list[dict]) -> tuple[str, list[dict]]:
  """('device' or 'host', the complete events that are kernels / XLA ops)."""
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') != 'M':
      continue
    if e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  complete = [e for e in events if e.get('ph') == 'X' and e.get('dur', 0) > 0]
  device_pids = {pid for pid, name in processes.items() if name.startswith('/device:')}
  if device_pids:
    # A GPU's kernels are on its stream lines; 'XLA Ops' / 'XLA Modules' lines repeat them.
    streams = {k for k, name in threads.items() if k[0] in device_pids and 'Stream' in name}
    if streams:
      return 'device', [e for e in complete if (e['pid'], e.get('tid')) in streams]
    return 'device', [e for e in complete if e['pid'] in device_pids
                      and 'XLA Ops' in threads.get((e['pid'], e.get('tid')), 'XLA Ops')]
  pool = {k for k, name in threads.items() if 'XLAEigen' in name}
  return 'host', [e for e in complete if (e['pid'], e.get('tid')) in pool
                  and not _CONTAINERS.match(e['name'])]


def busy_time(events: list[dict]) -> float:
  """Microseconds covered by at least one event (overlapping intervals counted once)."""
  total, end = 0.0, None
  for start, stop in sorted((e['ts'], e['ts'] + e['dur']) for e in events):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarize(events: list[dict], steps: int = 3, top: int = 25) -> dict:
  where, kernels = kernel_events(events)
  if not kernels:
    raise ValueError('the trace holds no kernel or XLA-op events: was a step run inside it?')
  by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
  for e in kernels:
    by_kind[kind_of(e['name'])] += e['dur']
    by_name[e['name']] += e['dur']
    count[e['name']] += 1
  total = sum(by_kind.values())
  span = max(e['ts'] + e['dur'] for e in kernels) - min(e['ts'] for e in kernels)
  ms = lambda us: us / 1e3 / steps
  return {
      'where': where, 'steps': steps, 'kernels': len(kernels),
      'kernel_ms_per_step': ms(total), 'busy_ms_per_step': ms(busy_time(kernels)),
      'span_ms_per_step': ms(span),
      'kinds': [(k, ms(v), v / total) for k, v in by_kind.most_common()],
      'top': [(n, ms(v), count[n] / steps, v / total) for n, v in by_name.most_common(top)],
  }


def report(s: dict) -> str:
  lines = [f"{s['kernels']} {'kernels' if s['where'] == 'device' else 'XLA ops'} over "
           f"{s['steps']} steps ({s['where']}): busy {s['busy_ms_per_step']:.2f} ms of a "
           f"{s['span_ms_per_step']:.2f} ms span per step "
           f"({s['busy_ms_per_step'] / s['span_ms_per_step']:.1%}); kernel time "
           f"{s['kernel_ms_per_step']:.2f} ms per step", '',
           '| kind | ms/step | share |', '| --- | ---: | ---: |']
  lines += [f'| {k} | {t:.2f} | {f:.1%} |' for k, t, f in s['kinds']]
  lines += ['', '| kernel | ms/step | calls/step | share |', '| --- | ---: | ---: | ---: |']
  for name, t, n, f in s['top']:
    short = name if len(name) <= 90 else name[:87] + '...'
    lines.append(f'| `{short}` | {t:.3f} | {n:g} | {f:.1%} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('trace', help='perfetto_trace.json.gz, or a directory holding one')
  p.add_argument('--steps', type=int, default=3, help='steps in the trace (default 3, as '
                 'tools/benchmark.py --profile traces)')
  p.add_argument('--top', type=int, default=25, help='kernels listed (default 25)')
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error('--steps must be >= 1')
  print(report(summarize(load_events(find_trace(args.trace)), args.steps, args.top)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
