"""Multi-host training for real: two processes on 127.0.0.1 (gloo collectives, 2 CPU devices
each, one mesh over all 4) against one process with 4 devices, and checkpoints moving between
the two layouts."""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.numerics import assert_close_f32
from tests.test_launch import FAMILY_RUN, ROOT, family_run, launch, ok, subprocess_env
from trainer.summaries import read_scalars

def free_port(low=20000, high=60000) -> int:
  while True:
    port = random.randint(low, high)
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
        return port
      except OSError:
        continue


def start_two(*args, slurm=False, devices=2):
  """Starts `launch.py *args` as processes 0 and 1 of one run. With `slurm`, the processes find
  each other as SLURM tasks do, through --multihost and the environment alone (JAX's cluster
  auto-detection), instead of the three flags."""
  port = free_port(61440, 65535) if slurm else free_port()
  procs = []
  for i in range(2):
    env = subprocess_env(devices)
    if slurm:   # JAX derives the coordinator port from the job id: 61440 + id % 4096
      env.update(SLURM_JOB_ID=str(port - 61440 + 4096 * 7), SLURM_STEP_NODELIST='127.0.0.1',
                 SLURM_NTASKS='2', SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
      flags = ['--multihost']
    else:
      flags = [f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), *args,
                                   *flags], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, status=0):
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  for r in results:
    assert r.returncode == status, r.stderr[-3000:]
  return results


def launch_two(*args, slurm=False, devices=2):
  return finish(start_two(*args, slurm=slurm, devices=devices))


def losses(workdir):
  return dict(read_scalars(os.path.join(workdir, 'tensorboard'))['learning/loss'])


def check_two_process_run(p0, p1, wd, reference, steps,
                          mesh="{'data': 1, 'fsdp': 4, 'tensor': 1}"):
  """Same global batch, same losses: each process fed its half, and the halves made the whole;
  process 0 alone wrote events and drew the progress bar; both wrote checkpoint shards."""
  got, want = losses(wd), losses(reference)
  assert sorted(got)[:len(steps)] == list(steps)
  assert_close_f32([got[s] for s in steps], [want[s] for s in steps], rel=1e-5)
  assert 'process 0 of 2 reads rows 0-3 of each global batch of 8' in p0.stderr
  assert 'process 1 of 2 reads rows 4-7 of each global batch of 8' in p1.stderr
  assert f"mesh {mesh} over 4 devices (2 processes)" in p1.stderr
  assert len(os.listdir(os.path.join(wd, 'tensorboard'))) == 1
  assert ('it/s' in p0.stderr or 's/it' in p0.stderr)
  assert 'it/s' not in p1.stderr and 's/it' not in p1.stderr
  step = max(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')))
  state = os.path.join(wd, 'checkpoints', str(step), 'state')
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(os.listdir(state))
  assert 'every host must see the same directory' in p0.stderr   # a local path, 2 processes


def test_two_processes_match_one_dit_found_through_slurm(tmp_path, tmp_path_factory):
  reference, _ = family_run(tmp_path_factory, 'DiT_T_Synthetic')
  wd = str(tmp_path / 'two')
  # the processes find each other from a (simulated) SLURM job's environment: --multihost alone
  p0, p1 = launch_two('--exp=DiT_T_Synthetic', f'--workdir={wd}', *FAMILY_RUN,
                      '--set', 'NUM_STEPS=3', slurm=True)
  check_two_process_run(p0, p1, wd, reference, (1, 2, 3))
  assert 'final eval: loss=' in p0.stdout and 'final eval: loss=' in p1.stdout
  assert os.listdir(os.path.join(wd, 'samples')) == ['step_3.png']


def test_two_processes_match_one_and_sigterm_to_one_stops_both(tmp_path, tmp_path_factory):
  """ViT on two processes, stopped by a SIGTERM that reaches only process 1 (a preemption notice
  reaching one host first): both stop at the same step, after saving it."""
  reference, _ = family_run(tmp_path_factory, 'ViT_T_Synthetic')
  wd = str(tmp_path / 'two')
  procs = start_two('--exp=ViT_T_Synthetic', f'--workdir={wd}', *FAMILY_RUN,
                    '--set', 'NUM_STEPS=100000', '--set', 'CKPT_EVERY=1000')
  events = os.path.join(wd, 'tensorboard')
  deadline = time.time() + 300
  while not (os.path.isdir(events) and len(read_scalars(events).get('learning/loss', [])) >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(1)
  procs[1].send_signal(signal.SIGTERM)
  p0, p1 = finish(procs, status=0)
  stops = [int(r.stderr.split('stopped by SIGTERM at step ')[1].split()[0]) for r in (p0, p1)]
  assert stops[0] == stops[1] >= 3
  assert os.listdir(os.path.join(wd, 'checkpoints')) == [str(stops[0])]
  check_two_process_run(p0, p1, wd, reference, range(1, min(stops[0], 6) + 1))


def test_two_processes_data_parallel_sum_their_gradients_in_one_all_reduce(tmp_path,
                                                                          tmp_path_factory):
  """A data-parallel mesh over two hosts' CPUs: GRAD_SYNC's default sums each step's gradients
  in one gloo all-reduce of one vector, and the losses are the one-process FSDP run's."""
  reference, _ = family_run(tmp_path_factory, 'ViT_T_Synthetic')
  wd = str(tmp_path / 'two')
  p0, p1 = launch_two('--exp=ViT_T_Synthetic', f'--workdir={wd}', *FAMILY_RUN,
                      '--set', 'NUM_STEPS=3', '--set', "MESH={'data': -1, 'fsdp': 1}")
  check_two_process_run(p0, p1, wd, reference, (1, 2, 3),
                        mesh="{'data': 4, 'fsdp': 1, 'tensor': 1}")
  assert 'gradients summed by one flat all-reduce (GRAD_SYNC=auto)' in p0.stderr


def test_gpt_checkpoints_move_between_one_and_two_processes(tmp_path, tmp_path_factory):
  """GPT on two processes matches one; its checkpoint resumes in one process on one device, and
  a 1-process checkpoint in two processes; both continue as the uninterrupted run did."""
  exp = ['--exp=GPT_T_Synthetic', *FAMILY_RUN]
  reference, _ = family_run(tmp_path_factory, 'GPT_T_Synthetic')
  want = losses(reference)

  two = str(tmp_path / 'two_then_one')
  p0, p1 = launch_two(*exp, f'--workdir={two}', '--set', 'NUM_STEPS=3')
  check_two_process_run(p0, p1, two, reference, (1, 2, 3))
  # one device: the sharded run and the unsharded one train the same model
  one = ok(launch(*exp, f'--workdir={two}', devices=1))
  assert 'Resuming from step 3' in one.stderr and "'fsdp': 1" in one.stderr
  assert 'knobs changed since the checkpoint: NUM_STEPS=3 there, 6 here' in one.stderr
  got = losses(two)
  assert_close_f32([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rel=1e-5)
  # each invocation's config is kept, the first one's too
  assert open(os.path.join(two, 'config.txt')).read().count('# ---- ') == 2

  one_then_two = str(tmp_path / 'one_then_two')
  shutil.copytree(reference, one_then_two)
  shutil.rmtree(os.path.join(one_then_two, 'checkpoints', '6'))
  shutil.rmtree(os.path.join(one_then_two, 'tensorboard'))
  p0, _ = launch_two(*exp, f'--workdir={one_then_two}')
  assert 'Resuming from step 3' in p0.stderr
  got = losses(one_then_two)
  assert sorted(got) == [4, 5, 6]
  assert_close_f32([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rel=1e-5)


_TENSOR_ACROSS_HOSTS = textwrap.dedent("""
    import sys
    import jax
    jax.config.update('jax_num_cpu_devices', 2)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{sys.argv[1]}', num_processes=2,
                               process_id=int(sys.argv[2]))
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from input.synthetic import SyntheticTokens
    from trainer import state as state_lib

    # fsdp pairs devices within a host, tensor pairs them across hosts: both hosts hold every
    # row of the batch (each its own tensor half of the model), so both must load all 8 rows
    d = np.array(jax.devices()).reshape(2, 2)            # [process, local device]
    mesh = Mesh(d.T.reshape(1, 2, 2), ('data', 'fsdp', 'tensor'))
    sharding = state_lib.batch_sharding(mesh, 8)
    source = SyntheticTokens(global_batch=8, seq_len=4)
    state_lib.feed([source], sharding, 8)
    batch = state_lib.to_global(sharding, source.batch(5), 8)
    whole = SyntheticTokens(global_batch=8, seq_len=4, process_index=0,
                            process_count=1).batch(5)['tokens']
    for shard in batch['tokens'].addressable_shards:   # every device holds the right rows
      np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index])
    total = jax.jit(lambda t: jnp.sum(t * jnp.arange(1, 9)[:, None]))(batch['tokens'])
    assert int(total) == int((whole * np.arange(1, 9)[:, None]).sum())
    print('rows', source.rows.tolist())
""")


def test_rows_follow_the_batch_sharding_when_hosts_share_rows():
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, '-c', _TENSOR_ACROSS_HOSTS, str(port), str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert 'rows [0, 1, 2, 3, 4, 5, 6, 7]' in out   # not process_index's half



def test_a_cluster_job_without_multihost_warns():
  """N copies of a command in an N-task SLURM job, without --multihost, would each train alone
  into one workdir: say so."""
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node1', 'SLURM_NTASKS': '4',
           'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
  out = ok(launch('--exp=ViT_T_Synthetic', '--dry_run', env=slurm))
  assert 'SLURM reports 4 processes but this one runs alone' in out.stderr
  assert 'Pass --multihost (or set ZOO_MULTIHOST=1)' in out.stderr
  quiet = ok(launch('--exp=ViT_T_Synthetic', '--dry_run'))
  assert 'runs alone' not in quiet.stderr
