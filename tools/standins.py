"""Small stand-ins for the raw data of each dataset, in its real layout, deterministic from a seed.

Tests build the real TFDS builders from them, the input benchmark reads them, and a user without
the data can try the whole pipeline offline:

    python tools/standins.py DIR     # writes DIR/{ilsvrc,image_folder,owt,celebahq,lsun}
    python tools/build_dataset.py celebahq64 --data_dir=DATA --source=DIR/celebahq
    python tools/build_dataset.py openwebtext --data_dir=DATA --source=DIR/owt --holdout_every=4

    ilsvrc_tars(dir)        ILSVRC2012_img_train.tar (one <synset>.tar per class inside) and
                            ILSVRC2012_img_val.tar, as imagenet2012's manual_dir holds them
    image_folder(dir)       dir/<split>/<class>/*.jpg|png, tfds.folder_dataset.ImageFolder's layout
    owt_files(dir)          OpenWebText-like documents as .jsonl, .txt or .parquet files
    celebahq_folder(dir)    dir/<train|validation>/<female|male>/*, korexyz/celeba-hq-256x256's
    lsun_folder(dir)        non-square church-like images in nested folders

Pixels are smooth random colour fields with mild noise: cheap to make, and JPEG sizes come out
like real photographs' (about 60 KB at ImageNet's 500x375, quality 90, with ImageNet's noise).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import sys
import tarfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


# ---- pixels --------------------------------------------------------------------------------------

def smooth_field(rng: np.random.Generator, width: int, height: int, noise: float = 4.0,
                 tint=(1.0, 1.0, 1.0), grid: int = 5) -> np.ndarray:
  """uint8 [height, width, 3]: a bicubic blow-up of a coarse random grid, tinted, plus noise."""
  from PIL import Image
  coarse = rng.uniform(0, 255, (grid, grid, 3)).astype(np.uint8)
  field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                     np.float32)
  field = field * np.asarray(tint, np.float32) + rng.normal(0, noise, field.shape)
  return np.clip(field, 0, 255).astype(np.uint8)


def encoded(array: np.ndarray, fmt: str, quality: int = 90, mode: str | None = None) -> bytes:
  from PIL import Image
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  out = io.BytesIO()
  image.save(out, format=fmt, **({'quality': quality} if fmt in ('JPEG', 'WEBP') else {}))
  return out.getvalue()


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0  # the same bytes for the same seed
  tar.addfile(info, io.BytesIO(data))


# ---- ImageNet ------------------------------------------------------------------------------------

def _imagenet_file(name: str) -> pathlib.Path:
  # find_spec, not import: tfds's label files without importing tfds.
  spec = importlib.util.find_spec('tensorflow_datasets')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError('the ImageNet stand-in takes its synsets from tensorflow-datasets: '
                              'pip install tensorflow-datasets')
  root = pathlib.Path(spec.submodule_search_locations[0]) / 'datasets' / 'imagenet2012'
  return root / name


def imagenet_synsets() -> list[str]:
  """The 1000 synsets in tfds's label order (label i is line i of labels.txt)."""
  return _imagenet_file('labels.txt').read_text().split()


def ilsvrc_tars(manual_dir, num_classes: int = 3, per_class: int = 4, num_val: int = 6,
                size=(500, 375), seed: int = 0) -> dict:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into `manual_dir`.

  The train tar holds one <synset>.tar per class (the first num_classes synsets of tfds's
  labels.txt), each holding <synset>_<k>.JPEG; the val tar holds ILSVRC2012_val_%08d.JPEG,
  k = 1..num_val. tfds labels the validation images by zipping their sorted names with the lines
  of its validation_labels.txt, so theirs are that file's first num_val lines. Sizes vary around
  `size`; the second image of the first class is portrait and the third greyscale (an 'L' JPEG,
  as about 1 in 500 real ImageNet images is), to exercise the decoders.

  Returns {'synsets': the classes, 'train_files': {file name: label id}, 'val_files': the val
  file names, 'val_labels': their synsets, 'val_label_ids': their label ids}.
  """
  rng = np.random.default_rng(seed)
  manual_dir = pathlib.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  all_synsets = imagenet_synsets()
  synsets = all_synsets[:num_classes]
  width, height = size

  def photo(portrait=False, grey=False) -> bytes:
    w, h = width + int(rng.integers(-60, 61)), height + int(rng.integers(-40, 41))
    if portrait:
      w, h = h, w
    return encoded(smooth_field(rng, w, h, noise=10.0, grid=8), 'JPEG', quality=90,
                   mode='L' if grey else None)

  train_files = {}
  with tarfile.open(manual_dir / 'ILSVRC2012_img_train.tar', 'w') as outer:
    for label, synset in enumerate(synsets):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for k in range(per_class):
          name = f'{synset}_{k}.JPEG'
          first_class = label == 0
          _add_to_tar(inner, name, photo(portrait=first_class and k == 1,
                                         grey=first_class and k == 2))
          train_files[name] = label
      _add_to_tar(outer, f'{synset}.tar', inner_bytes.getvalue())

  val_files = [f'ILSVRC2012_val_{k:08d}.JPEG' for k in range(1, num_val + 1)]
  with tarfile.open(manual_dir / 'ILSVRC2012_img_val.tar', 'w') as tar:
    for k, name in enumerate(val_files):
      _add_to_tar(tar, name, photo(portrait=k == 0))
  val_labels = _imagenet_file('validation_labels.txt').read_text().split()[:num_val]
  index = {s: i for i, s in enumerate(all_synsets)}
  return {'synsets': synsets, 'train_files': train_files, 'val_files': val_files,
          'val_labels': val_labels, 'val_label_ids': [index[s] for s in val_labels]}


# ---- image folders -------------------------------------------------------------------------------

def image_folder(root, splits=('train', 'test'), classes=('cat', 'dog'), per_class: int = 3,
                 size=(40, 30), seed: int = 0) -> dict:
  """root/<split>/<class>/<class>_<k>.jpg|png (alternating), tfds.folder_dataset.ImageFolder's
  layout. Returns {split: {class: [paths]}}."""
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  out = {}
  for split in splits:
    out[split] = {}
    for cls in classes:
      folder = root / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      paths = []
      for k in range(per_class):
        fmt, suffix = ('JPEG', 'jpg') if k % 2 == 0 else ('PNG', 'png')
        path = folder / f'{cls}_{k}.{suffix}'
        path.write_bytes(encoded(smooth_field(rng, *size), fmt))
        paths.append(path)
      out[split][cls] = paths
  return out


# ---- CelebA-HQ -----------------------------------------------------------------------------------

# Female images are reddish, male bluish, so a test can tell that a label travelled with its
# image.
CELEBAHQ_TINTS = {'female': (1.0, 0.45, 0.3), 'male': (0.3, 0.45, 1.0)}


def celebahq_folder(root, per_class: int = 3, size: int = 256, seed: int = 0) -> dict:
  """root/<train|validation>/<female|male>/*, the layout of korexyz/celeba-hq-256x256 exported
  to files: mostly size x size RGB JPEGs like the hub's, and per split and class one PNG and one
  larger non-square JPEG, to exercise the crop and resize. Returns {split: {label: [paths]}}."""
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  out = {}
  for split in ('train', 'validation'):
    out[split] = {}
    for label, tint in CELEBAHQ_TINTS.items():
      folder = root / split / label
      folder.mkdir(parents=True, exist_ok=True)
      paths = []
      for k in range(per_class):
        width, height = (size + 44, size + 20) if k == 1 else (size, size)
        fmt, suffix = ('PNG', 'png') if k == 2 else ('JPEG', 'jpg')
        path = folder / f'{split}_{label}_{k:03d}.{suffix}'
        path.write_bytes(encoded(smooth_field(rng, width, height, tint=tint), fmt, quality=95))
        paths.append(path)
      out[split][label] = paths
  return out


# ---- LSUN ----------------------------------------------------------------------------------------

def lsun_folder(root, n: int = 5, seed: int = 0) -> list[pathlib.Path]:
  """n non-square images, short side 256 to 320, in nested folders (as LSUN exports are) and
  mixed formats (webp as LSUN's own, JPEG, PNG). Outside its centred square each image is pure
  red, inside it greenish, so a test can tell a centre crop from a squash. Returns the paths."""
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  formats = [('WEBP', 'webp'), ('JPEG', 'jpg'), ('PNG', 'png')]
  paths = []
  for k in range(n):
    short = int(rng.integers(256, 321))
    long = short + int(rng.integers(40, 200))
    width, height = (long, short) if k % 2 == 0 else (short, long)
    array = np.zeros((height, width, 3), np.uint8)
    array[..., 0] = 255
    top, left = (height - short) // 2, (width - short) // 2
    array[top:top + short, left:left + short] = smooth_field(rng, short, short,
                                                             tint=(0.1, 1.0, 0.5))
    fmt, suffix = formats[k % len(formats)]
    path = root / f'{k % 2:02d}' / f'church_{k:04d}.{suffix}'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(array, fmt, quality=95))
    paths.append(path)
  return paths


# ---- OpenWebText ---------------------------------------------------------------------------------

_WORDS = ('the of and to in is was for on that with as by at from his her it an were are which '
          'this be or has had not but also its they first one their after new two been who '
          'city river church school year years time people world war state government music '
          'team season game film book album song series company market water light stone '
          'garden village station bridge letter morning evening winter summer history council '
          'report study method result data system model energy value price street house '
          'around between during under through against because although however therefore '
          'quickly slowly quietly early later often never always together perhaps').split()
_EXTRAS = ('café', 'naïve', '—', '“quoted”', '2019', '3.14', 'e-mail', "don't", 'U.S.', '(see)',
           '日本', '🙂')


def documents(num_docs: int, seed: int = 0) -> list[str]:
  """English-looking documents of about 20 to 400 words (230 GPT-2 tokens on average):
  sentences from a fixed word list, some non-ASCII and punctuation, paragraphs separated by
  blank lines."""
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(num_docs):
    paragraphs = []
    for _ in range(int(rng.integers(1, 5))):
      sentences = []
      for _ in range(int(rng.integers(2, 12))):
        words = [str(w) for w in rng.choice(_WORDS, int(rng.integers(6, 18)))]
        if rng.random() < 0.3:
          words.insert(int(rng.integers(0, len(words))), str(rng.choice(_EXTRAS)))
        sentences.append(' '.join(words).capitalize() + str(rng.choice(['.', '.', '?', '!'])))
      paragraphs.append(' '.join(sentences))
    docs.append('\n\n'.join(paragraphs))
  return docs


def owt_files(root, num_docs: int = 80, seed: int = 0, kind: str = 'jsonl') -> list[str]:
  """Writes `documents(num_docs, seed)` under root as kind files: jsonl and parquet in two files
  (part-00000, part-00001) so multi-file order counts, txt one file per document. The default 80
  documents are 18.3k GPT-2 tokens: 6 train blocks of 2048 and 2 validation blocks with
  holdout_every=4. Returns the documents in reading order."""
  if kind not in ('jsonl', 'txt', 'parquet'):
    raise ValueError(f"kind must be 'jsonl', 'txt' or 'parquet', got {kind!r}")
  docs = documents(num_docs, seed)
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  if kind == 'txt':
    for i, doc in enumerate(docs):
      (root / f'doc_{i:06d}.txt').write_text(doc, encoding='utf-8')
    return docs
  half = (len(docs) + 1) // 2
  for part, chunk in enumerate((docs[:half], docs[half:])):
    if kind == 'jsonl':
      lines = (json.dumps({'text': d, 'url': f'https://example.com/{part}/{i}'})
               for i, d in enumerate(chunk))
      (root / f'part-{part:05d}.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    else:
      import pyarrow as pa
      import pyarrow.parquet as pq
      pq.write_table(pa.table({'text': chunk}), root / f'part-{part:05d}.parquet')
  return docs


def main(argv):
  if len(argv) != 2:
    print(__doc__.split('\n\n')[1], file=sys.stderr)
    return 2
  root = pathlib.Path(argv[1])
  ilsvrc_tars(root / 'ilsvrc')
  image_folder(root / 'image_folder')
  owt_files(root / 'owt')
  celebahq_folder(root / 'celebahq')
  lsun_folder(root / 'lsun')
  print(f'wrote {", ".join(sorted(p.name for p in root.iterdir()))} under {root}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
