"""Malformed IDX datasets and failing TFDS preparation must end in ``DatasetError``.

Every case starts from a small valid IDX set built here (20 train + 10 test 28x28 uint8
images, labels 0..9, plain or gzipped), breaks one file, and checks that
``load_dataset('idx:DIR')`` raises ``DatasetError`` naming that file, never another
exception type and never a silently accepted dataset. The seeded fuzz cases check each
outcome against an independent parse of the bytes written.
"""

import gzip
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from stepnet_jax.data import datasets
from stepnet_jax.data.datasets import DatasetError

KEYS = tuple(datasets.IDX_FILES)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
  """The IDX encoding of ``array`` (uint8 payload, big-endian dimension sizes)."""
  array = np.asarray(array, np.uint8)
  return bytes([0, 0, type_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def header(ndim: int, *dims: int, type_code: int = 0x08) -> bytes:
  """An IDX header declaring ``ndim`` dimensions of sizes ``dims`` (which may disagree with ndim)."""
  return bytes([0, 0, type_code, ndim]) + struct.pack(f'>{len(dims)}I', *dims)


def gz(payload: bytes) -> bytes:
  """gzip bytes of ``payload`` (fixed mtime: the same bytes every run)."""
  return gzip.compress(payload, mtime=0)


def valid_arrays() -> dict[str, np.ndarray]:
  """20 train + 10 test random 28x28 images; labels cover 0..9 (each twice in train)."""
  rng = np.random.default_rng(1234)
  return {
    'train_images': rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
    'train_labels': np.array([i % 10 for i in range(20)], np.uint8),
    'test_images': rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
    'test_labels': np.array([9, 0, 1, 2, 3, 4, 5, 6, 7, 8], np.uint8),
  }


def write_set(root, gzipped: bool = False, files: dict[str, bytes | None] | None = None) -> dict[str, str]:
  """Writes the valid set to ``root``; ``files[key]`` replaces a file's raw bytes (None: no file).

  Raw bytes are written as given (a ``.gz`` file gets exactly these bytes, compressed or
  not). Returns each key's path.
  """
  files = files or {}
  arrays = valid_arrays()
  os.makedirs(root, exist_ok=True)
  paths = {}
  for key, stem in datasets.IDX_FILES.items():
    path = os.path.join(str(root), stem + ('.gz' if gzipped else ''))
    paths[key] = path
    raw = files[key] if key in files else (gz if gzipped else bytes)(idx_bytes(arrays[key]))
    if raw is not None:
      with open(path, 'wb') as f:
        f.write(raw)
  return paths


def assert_consistent(ds: datasets.Dataset):
  """A loaded dataset: uint8 [N, H, W, 1] images, one int32 label in range per image."""
  for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 1 and len(images) > 0
    assert labels.dtype == np.int32 and labels.shape == (len(images),)
    assert labels.min() >= 0 and labels.max() < ds.num_classes
  assert ds.train_images.shape[1:] == ds.test_images.shape[1:]


# ------------------------------------------------------------------ the valid set itself


@pytest.mark.parametrize('gzipped', [False, True])
def test_valid_set_loads(tmp_path, gzipped):
  """The base set loads exactly (so every failure below is caused by the corruption)."""
  write_set(tmp_path, gzipped)
  ds = datasets.load_dataset(f'idx:{tmp_path}')
  arrays = valid_arrays()
  for key in KEYS:
    got = getattr(ds, key)
    np.testing.assert_array_equal(got[..., 0] if key.endswith('images') else got, arrays[key])
  assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
  assert_consistent(ds)


# ------------------------------------------------------------------ hand-made malformed files

_A = valid_arrays()
_TRAIN = idx_bytes(_A['train_images'])
_DEFLATE_BAD_BLOCK = bytearray(gz(_TRAIN))
_DEFLATE_BAD_BLOCK[10] = 0x07  # first deflate block: BFINAL=1, BTYPE=11 (reserved) -> zlib.error
_CRC_BAD = bytearray(gz(_TRAIN))
_CRC_BAD[-8] ^= 0xFF

# (id, file to break, gzipped set, raw bytes of that file (None: missing), message fragment)
MALFORMED = [
  ('empty-plain', 'train_images', False, b'', 'magic'),
  ('empty-gz-file', 'test_labels', True, b'', 'magic'),
  ('empty-gz-stream', 'train_labels', True, gz(b''), 'magic'),
  ('magic-only', 'train_images', False, _TRAIN[:4], 'header truncated'),
  ('header-cut', 'train_images', False, _TRAIN[:9], 'header truncated'),
  ('truncated-1', 'train_images', False, _TRAIN[:-1], 'header promises'),
  ('truncated-half', 'test_images', False, idx_bytes(_A['test_images'])[:3000], 'header promises'),
  ('truncated-labels', 'train_labels', False, idx_bytes(_A['train_labels'])[:-3], 'header promises'),
  ('truncated-payload-gz', 'train_images', True, gz(_TRAIN[:-100]), 'header promises'),
  ('trailing-bytes', 'test_labels', False, idx_bytes(_A['test_labels']) + b'\0', 'header promises'),
  ('header-more', 'train_images', False, header(3, 21, 28, 28) + _A['train_images'].tobytes(), 'header promises'),
  ('header-less', 'train_images', False, header(3, 19, 28, 28) + _A['train_images'].tobytes(), 'header promises'),
  ('header-huge', 'train_images', False, header(3, 2**32 - 1, 2**32 - 1, 2**32 - 1), 'header promises'),
  ('header-int64-wrap', 'train_images', False, header(3, 2**31, 2**31, 4), 'header promises'),
  ('magic-byte0', 'train_images', False, b'\x01' + _TRAIN[1:], 'magic'),
  ('magic-gzip-id', 'test_images', False, b'\x1f\x8b' + idx_bytes(_A['test_images'])[2:], 'magic'),
  ('type-float32', 'train_images', False, idx_bytes(_A['train_images'], 0x0D), 'element type'),
  ('type-int8', 'train_labels', False, idx_bytes(_A['train_labels'], 0x09), 'element type'),
  ('type-int32-gz', 'test_labels', True, gz(idx_bytes(_A['test_labels'], 0x0C)), 'element type'),
  ('ndim-0', 'test_labels', False, header(0) + b'\x05', '0 dimensions'),
  ('ndim-255', 'train_images', False, header(255) + b'\0' * 64, 'header truncated'),
  ('images-2d', 'train_images', False, idx_bytes(_A['train_images'].reshape(20, 784)), '3-D'),
  ('images-1d', 'test_images', False, idx_bytes(_A['test_images'].reshape(-1)), '3-D'),
  ('images-4d', 'train_images', False, idx_bytes(_A['train_images'][..., None]), '3-D'),
  ('labels-2d', 'train_labels', False, idx_bytes(_A['train_labels'].reshape(2, 10)), '1-D'),
  ('labels-2d-column', 'test_labels', True, gz(idx_bytes(_A['test_labels'][:, None])), '1-D'),
  ('labels-fewer', 'train_labels', False, idx_bytes(_A['train_labels'][:19]), '19 labels for 20 images'),
  ('labels-more', 'test_labels', False, idx_bytes(np.zeros(11)), '11 labels for 10 images'),
  ('images-fewer', 'test_images', False, idx_bytes(_A['test_images'][:9]), '10 labels for 9 images'),
  ('images-n0', 'train_images', False, idx_bytes(np.zeros((0, 28, 28))), 'no images'),
  ('images-h0', 'train_images', False, idx_bytes(np.zeros((20, 0, 28))), 'no images'),
  ('images-w0-gz', 'test_images', True, gz(idx_bytes(np.zeros((10, 28, 0)))), 'no images'),
  ('image-size-mismatch', 'test_images', False, idx_bytes(np.zeros((10, 27, 28))), '(27, 28)'),
  ('gz-not-gzip', 'train_images', True, _TRAIN, 'corrupt or truncated gzip'),
  ('gz-random-bytes', 'test_labels', True, np.random.default_rng(5).bytes(300), 'corrupt or truncated gzip'),
  ('gz-truncated-stream', 'train_images', True, gz(_TRAIN)[:200], 'corrupt or truncated gzip'),
  ('gz-no-trailer', 'train_images', True, gz(_TRAIN)[:-8], 'corrupt or truncated gzip'),
  ('gz-bad-block', 'train_images', True, bytes(_DEFLATE_BAD_BLOCK), 'corrupt or truncated gzip'),
  ('gz-bad-crc', 'train_images', True, bytes(_CRC_BAD), 'corrupt or truncated gzip'),
  ('gz-trailing-garbage', 'test_images', True, gz(idx_bytes(_A['test_images'])) + b'junk', 'corrupt or truncated gzip'),
]


@pytest.mark.parametrize('key,gzipped,raw,what', [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_file_raises_dataset_error(tmp_path, key, gzipped, raw, what):
  """One broken file: a DatasetError naming that file and what is wrong."""
  paths = write_set(tmp_path, gzipped, {key: raw})
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset(f'idx:{tmp_path}')
  msg = str(e.value)
  assert paths[key] in msg and what in msg, msg


def test_both_files_of_a_split_empty(tmp_path):
  """0 images with 0 labels is consistent but useless: refused, not a dataset with an empty split."""
  for split in ('train', 'test'):
    root = tmp_path / split
    paths = write_set(
      root, files={f'{split}_images': idx_bytes(np.zeros((0, 28, 28))), f'{split}_labels': idx_bytes(np.zeros(0))}
    )
    with pytest.raises(DatasetError, match='no images') as e:
      datasets.load_dataset(f'idx:{root}')
    assert paths[f'{split}_images'] in str(e.value)


@pytest.mark.parametrize('key', KEYS)
@pytest.mark.parametrize('gzipped', [False, True])
def test_missing_file(tmp_path, key, gzipped):
  """Any one of the four files missing: the error names the file that was looked for."""
  write_set(tmp_path, gzipped, {key: None})
  with pytest.raises(DatasetError, match='missing IDX file') as e:
    datasets.load_dataset(f'idx:{tmp_path}')
  assert os.path.join(str(tmp_path), datasets.IDX_FILES[key]) in str(e.value)


def test_directory_in_place_of_a_file(tmp_path):
  """An OSError other than a missing file (here EISDIR) is a DatasetError naming the path."""
  paths = write_set(tmp_path, files={'train_labels': None})
  os.mkdir(paths['train_labels'])
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset(f'idx:{tmp_path}')
  assert paths['train_labels'] in str(e.value)


@pytest.mark.parametrize('gzipped', [False, True])
def test_read_idx_errors_are_dataset_errors(tmp_path, gzipped):
  """read_idx on its own: a missing path and a zlib-level corruption are DatasetErrors too."""
  with pytest.raises(DatasetError, match='no such IDX file'):
    datasets.read_idx(str(tmp_path / ('nope.gz' if gzipped else 'nope')))
  path = str(tmp_path / 'bad.gz')
  with open(path, 'wb') as f:
    f.write(bytes(_DEFLATE_BAD_BLOCK))
  with pytest.raises(zlib.error):  # what gzip itself raises for this file
    gzip.decompress(bytes(_DEFLATE_BAD_BLOCK))
  with pytest.raises(DatasetError, match=r'corrupt or truncated gzip data \(zlib\.error'):
    datasets.read_idx(path)


# ------------------------------------------------------------------ labels and num_classes


@pytest.mark.parametrize('bad', [10, 17, 255])
def test_test_label_outside_training_classes(tmp_path, bad):
  """A test label the training labels never reach is an error, not a larger num_classes."""
  labels = _A['test_labels'].copy()
  labels[4] = bad
  paths = write_set(tmp_path, files={'test_labels': idx_bytes(labels)})
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset(f'idx:{tmp_path}')
  msg = str(e.value)
  assert paths['test_labels'] in msg and f'{bad} at index 4' in msg and '0..9' in msg, msg


def test_num_classes_from_training_labels(tmp_path):
  """num_classes = max training label + 1; gaps in the training labels are allowed."""
  train = np.array([i % 5 for i in range(20)], np.uint8)  # classes 0..4
  test = np.array([4, 3, 2, 1, 0, 0, 1, 2, 3, 4], np.uint8)
  write_set(tmp_path / 'five', files={'train_labels': idx_bytes(train), 'test_labels': idx_bytes(test)})
  ds = datasets.load_dataset(f'idx:{tmp_path / "five"}')
  assert ds.num_classes == 5
  np.testing.assert_array_equal(ds.test_labels, test)

  gap = np.array([(i % 9) + (i % 9 >= 3) for i in range(20)], np.uint8)  # 0..9 without 3
  assert 3 not in gap and gap.max() == 9
  write_set(tmp_path / 'gap', files={'train_labels': idx_bytes(gap)})  # test labels still hold a 3
  ds = datasets.load_dataset(f'idx:{tmp_path / "gap"}')
  assert ds.num_classes == 10
  np.testing.assert_array_equal(ds.train_labels, gap)


# ------------------------------------------------------------------ seeded random corruptions


def parse_idx(raw: bytes, gzipped: bool) -> np.ndarray | None:
  """Independent IDX parse of a file's bytes: the array, or None if it is not valid uint8 IDX."""
  if gzipped:
    try:
      raw = gzip.decompress(raw)
    except Exception:  # noqa: BLE001 - any failure means "not readable"
      return None
  if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 8 or raw[3] == 0 or len(raw) < 4 + 4 * raw[3]:
    return None
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)]
  body = raw[4 + 4 * ndim :]
  if len(body) != int(np.prod(dims, dtype=object)):
    return None
  return np.frombuffer(body, np.uint8).reshape(dims)


KINDS = ('truncate', 'header_flip', 'data_flip', 'gzip_flip')
SEEDS = range(48)


def corrupt(seed: int) -> tuple[str, str, bool, bytes, str]:
  """Seeded corruption of one file of the valid set: (kind, key, gzipped, raw bytes, expected).

  ``expected`` is 'fail' (truncation; a test label flipped outside 0..9), 'load' (any
  other flipped data byte) or 'either' (header and gzip flips: decided by parse_idx).
  """
  rng = np.random.default_rng(seed)
  kind = KINDS[seed % len(KINDS)]
  key = KEYS[int(rng.integers(len(KEYS)))]
  gzipped = kind == 'gzip_flip' or bool(rng.integers(2))
  payload = bytearray(idx_bytes(_A[key]))
  head = 4 + 4 * _A[key].ndim
  expected = 'either'
  if kind == 'truncate':
    full = gz(bytes(payload)) if gzipped else bytes(payload)
    return kind, key, gzipped, full[: int(rng.integers(len(full)))], 'fail'
  if kind == 'header_flip':  # random bits, or an off-by-one (ndim 2 or 4, one image too many, ...)
    for i in rng.choice(head, size=int(rng.integers(1, 3)), replace=False):
      if rng.integers(2):
        payload[i] ^= int(rng.integers(1, 256))
      else:
        payload[i] = (payload[i] + int(rng.choice([-1, 1]))) % 256
  elif kind == 'data_flip':
    i = int(rng.integers(head, len(payload)))
    payload[i] ^= int(rng.integers(1, 256))
    # Train labels hold every class twice, so one flip never lowers num_classes.
    expected = 'fail' if key == 'test_labels' and payload[i] > 9 else 'load'
  else:
    raw = bytearray(gz(bytes(payload)))
    # Half the flips hit the gzip header or the first deflate block header, the rest anywhere.
    raw[int(rng.integers(min(64, len(raw)) if rng.integers(2) else len(raw)))] ^= int(rng.integers(1, 256))
    return kind, key, gzipped, bytes(raw), expected
  return kind, key, gzipped, gz(bytes(payload)) if gzipped else bytes(payload), expected


def load_corrupted(root, seed: int) -> str:
  """Loads the set with corruption ``seed``; checks the outcome and returns 'load' or 'fail'."""
  kind, key, gzipped, raw, expected = corrupt(seed)
  paths = write_set(root, gzipped, {key: raw})
  parsed = parse_idx(raw, gzipped)
  try:
    ds = datasets.load_dataset(f'idx:{root}')
  except DatasetError as e:
    assert expected != 'load', f'seed {seed}: {kind} of {key} should load: {e}'
    assert paths[key] in str(e), str(e)
    if key == 'test_labels' and parsed is not None and parsed.shape == (10,):
      assert parsed.max() > 9, f'seed {seed}: in-range test labels refused: {e}'
    return 'fail'
  assert expected != 'fail' and parsed is not None, f'seed {seed}: {kind} of {key} loaded a corrupt file'
  arrays = dict(valid_arrays(), **{key: parsed})
  assert_consistent(ds)
  for k in KEYS:
    got = getattr(ds, k)
    np.testing.assert_array_equal(got[..., 0] if k.endswith('images') else got, arrays[k])
  assert ds.num_classes == int(arrays['train_labels'].max()) + 1
  return 'load'


@pytest.mark.parametrize('seed', SEEDS)
def test_random_corruption(tmp_path, seed):
  """A seeded random corruption of one file: DatasetError naming it, or exactly the bytes written.

  Truncation always fails; a flipped image byte always loads (with that byte); a flipped
  label byte loads unless a test label leaves 0..9; header and gzip flips load only if
  an independent parse says the file is still valid.
  """
  load_corrupted(tmp_path, seed)


def test_random_corruptions_are_not_vacuous(tmp_path):
  """The seeds cover every kind of corruption, every file, and both outcomes."""
  outcomes = {}
  for seed in SEEDS:
    kind = corrupt(seed)[0]
    outcomes.setdefault(kind, set()).add(load_corrupted(tmp_path / str(seed), seed))
  assert outcomes['truncate'] == {'fail'} and outcomes['data_flip'] >= {'load'}
  assert outcomes['header_flip'] >= {'fail'} and outcomes['gzip_flip'] == {'fail', 'load'}
  assert {corrupt(seed)[1] for seed in SEEDS} == set(KEYS)


# ------------------------------------------------------------------ TFDS preparation failures


@pytest.fixture
def failing_tfds(monkeypatch):
  """Makes every TFDS builder's download_and_prepare raise the exception set in ``failure[0]``."""
  tfds = pytest.importorskip('tensorflow_datasets')
  failure, calls = [], []

  def download_and_prepare(self, **kwargs):
    calls.append(self.name)
    raise failure[0]()

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download_and_prepare)
  return failure, calls


def _no_tensorflow() -> ModuleNotFoundError:
  return ModuleNotFoundError("No module named 'tensorflow'", name='tensorflow')


def _no_tensorflow_tfds_style() -> ModuleNotFoundError:
  """As TFDS re-raises it: etils.epy.reraise adds a prefix and loses ``.name``."""
  from etils import epy

  try:
    try:
      raise _no_tensorflow()
    except ModuleNotFoundError as e:
      epy.reraise(e, prefix='Failed to construct dataset "mnist": ')
  except ModuleNotFoundError as wrapped:
    assert str(wrapped).startswith('Failed to construct') and wrapped.name is None
    return wrapped


def _no_tensorflow_as_cause() -> RuntimeError:
  err = RuntimeError('download_and_prepare failed')
  err.__cause__ = _no_tensorflow()
  return err


def _connection_error() -> ConnectionError:
  return ConnectionError('Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')


def _connection_error_after_optional_import() -> ConnectionError:
  """A network error raised while handling an ImportError (an optional import's fallback)."""
  try:
    raise ModuleNotFoundError("No module named 'brotli'", name='brotli')
  except ModuleNotFoundError:
    try:
      raise _connection_error()
    except ConnectionError as e:
      assert isinstance(e.__context__, ModuleNotFoundError)
      return e


MISSING_TENSORFLOW = (("'tensorflow' is not installed", 'pip install ".[tfds]"'), ('internet',))
NETWORK = (('internet access', 'Temporary failure in name resolution'), ('not installed',))


@pytest.mark.parametrize(
  'make, expected',
  [
    (_no_tensorflow, MISSING_TENSORFLOW),
    (_no_tensorflow_tfds_style, MISSING_TENSORFLOW),
    (_no_tensorflow_as_cause, MISSING_TENSORFLOW),
    (_connection_error, NETWORK),
    (_connection_error_after_optional_import, NETWORK),
  ],
)
def test_tfds_failures_name_their_cause(tmp_path, failing_tfds, make, expected):
  """A missing TensorFlow is reported as such, with the pip command, not as a network
  problem; a network failure keeps the internet hint, even with an unrelated ImportError
  as its context."""
  (present, absent), (failure, calls) = expected, failing_tfds
  failure.append(make)
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset('mnist', data_dir=str(tmp_path))
  msg = str(e.value)
  assert calls == ['mnist'], calls
  assert all(p in msg for p in present) and not any(a in msg for a in absent), msg


def test_tfds_package_itself_missing(monkeypatch):
  """Without tensorflow-datasets the error is a DatasetError naming it, not a bare ImportError."""
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset('mnist')
  msg = str(e.value)
  assert "'tensorflow_datasets' is not installed" in msg and 'pip install -e .' in msg, msg


@pytest.mark.parametrize('claimed', [(100, 28, 28), (2000, 1000, 1000)])
def test_a_decompression_bomb_is_refused_without_decompressing_it(tmp_path, claimed):
  """A 64 MiB zero stream gzipped to about 64 KB, under a header that claims either 78 KB of
  images (what is read stops one byte past the claim) or 2 GB (more than deflate can hold in
  that file: refused before reading). Either way the error names the file, and the reader
  allocates a few times the claim at most, never the 64 MiB (it took 1.6 GB before)."""
  import tracemalloc

  path = tmp_path / 'train-images-idx3-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(header(3, *claimed))
    zeros = bytes(1 << 20)
    for _ in range(64):
      f.write(zeros)
  tracemalloc.start()
  try:
    with pytest.raises(DatasetError, match=r'header promises') as e:
      datasets.read_idx(str(path))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert str(path) in str(e.value)
  assert peak < 8 * 2**20, peak
