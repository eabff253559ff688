"""Dataset loading: IDX files (real Fashion-MNIST and hand-written ones), digits, TFDS (mocked)."""

import dataclasses
import gzip
import os
import struct

import numpy as np
import pytest

from stepnet_jax import cli, config
from stepnet_jax.config import SettingsError
from stepnet_jax.data import datasets
from stepnet_jax.data.datasets import DatasetError

FMNIST = '/usr/share/datasets/fashion-mnist'


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
  array = np.asarray(array, np.uint8)
  return bytes([0, 0, type_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def write(path, payload: bytes):
  if str(path).endswith('.gz'):
    with gzip.open(path, 'wb') as f:
      f.write(payload)
  else:
    with open(path, 'wb') as f:
      f.write(payload)
  return str(path)


def make_idx_dir(root, n_train=7, n_test=3, h=5, w=4, gz=(), names=None, seed=0):
  """Four IDX files in ``root``; the keys in ``gz`` are gzipped."""
  rng = np.random.RandomState(seed)
  arrays = {
    'train_images': rng.randint(0, 256, (n_train, h, w)).astype(np.uint8),
    'train_labels': rng.randint(0, 4, n_train).astype(np.uint8),
    'test_images': rng.randint(0, 256, (n_test, h, w)).astype(np.uint8),
    'test_labels': rng.randint(0, 4, n_test).astype(np.uint8),
  }
  arrays['train_labels'][0] = 3  # 4 classes
  names = names or datasets.IDX_FILES
  os.makedirs(root, exist_ok=True)
  for key, arr in arrays.items():
    write(os.path.join(root, names[key] + ('.gz' if key in gz else '')), idx_bytes(arr))
  return arrays


# ------------------------------------------------------------------ real Fashion-MNIST


def _parse_gz_by_hand(path):
  raw = gzip.open(path, 'rb').read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)]
  return np.frombuffer(raw[4 + 4 * ndim :], np.uint8).reshape(dims)


def test_fashion_mnist_from_debian_package(fashion_mnist):
  ds = fashion_mnist
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 28, 28, 1) and ds.test_images.dtype == np.uint8
  assert ds.train_labels.shape == (60000,) and ds.train_labels.dtype == np.int32
  assert ds.test_labels.shape == (10000,) and ds.test_labels.dtype == np.int32
  assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
  # Fashion-MNIST is balanced: 6000 / 1000 images of each of the 10 classes.
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  # Same bytes as an independent parse of the gzipped files.
  np.testing.assert_array_equal(ds.test_images[..., 0], _parse_gz_by_hand(f'{FMNIST}/t10k-images-idx3-ubyte.gz'))
  np.testing.assert_array_equal(ds.train_labels, _parse_gz_by_hand(f'{FMNIST}/train-labels-idx1-ubyte.gz'))
  # The first training labels of Fashion-MNIST: ankle boot, T-shirt, T-shirt, dress, T-shirt.
  assert ds.train_labels[:5].tolist() == [9, 0, 0, 3, 0]


def test_read_idx_real_labels():
  labels = datasets.read_idx(f'{FMNIST}/t10k-labels-idx1-ubyte.gz')
  assert labels.shape == (10000,) and labels.dtype == np.uint8
  assert labels.min() == 0 and labels.max() == 9


def test_channel_stats_and_subset(fashion_mnist):
  small = datasets.subset(fashion_mnist, train=300, test=50, seed=3)
  assert small.train_images.shape == (300, 28, 28, 1) and small.test_labels.shape == (50,)
  assert len(np.unique(small.train_labels)) == 10  # class-mixed
  again = datasets.subset(fashion_mnist, train=300, test=50, seed=3)
  np.testing.assert_array_equal(small.train_images, again.train_images)
  other = datasets.subset(fashion_mnist, train=300, test=50, seed=4)
  assert not np.array_equal(small.train_labels, other.train_labels)
  # Every picked image is an original image with its own label.
  flat = fashion_mnist.test_images.reshape(10000, -1)
  for img, lab in zip(small.test_images, small.test_labels):
    idx = np.where((flat == img.reshape(-1)).all(axis=1))[0]
    assert len(idx) >= 1 and lab in fashion_mnist.test_labels[idx]
  # 0 keeps a split whole.
  whole = datasets.subset(fashion_mnist, train=0, test=20)
  assert len(whole.train_labels) == 60000 and len(whole.test_labels) == 20
  mean, std = small.channel_stats()
  x = small.train_images.astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, [x.mean()], rtol=1e-9)
  np.testing.assert_allclose(std, [x.std()], rtol=1e-9)


# ------------------------------------------------------------------ hand-written IDX files


@pytest.mark.parametrize('gz', [(), ('train_images', 'test_labels'), tuple(datasets.IDX_FILES)])
def test_idx_round_trip(tmp_path, gz):
  arrays = make_idx_dir(tmp_path, gz=gz)
  ds = datasets.load_dataset(f'idx:{tmp_path}')
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays['train_images'])
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays['test_images'])
  np.testing.assert_array_equal(ds.train_labels, arrays['train_labels'])
  np.testing.assert_array_equal(ds.test_labels, arrays['test_labels'])
  assert ds.train_images.shape == (7, 5, 4, 1) and ds.train_labels.dtype == np.int32
  assert ds.num_classes == 4


def test_idx_dotted_file_names(tmp_path):
  """MNIST mirrors also name the files train-images.idx3-ubyte (a dot instead of a dash)."""
  names = {k: v.replace('-idx', '.idx') for k, v in datasets.IDX_FILES.items()}
  arrays = make_idx_dir(tmp_path, names=names, gz=('test_images',))
  ds = datasets.load_idx(str(tmp_path))
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays['test_images'])


def test_read_idx_round_trip_any_rank(tmp_path):
  for shape in [(6,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]:
    arr = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    for suffix in ('', '.gz'):
      p = write(tmp_path / f'a{len(shape)}{suffix}', idx_bytes(arr))
      out = datasets.read_idx(p)
      assert out.dtype == np.uint8
      np.testing.assert_array_equal(out, arr)


def _assert_names(excinfo, *parts):
  msg = str(excinfo.value)
  for p in parts:
    assert str(p) in msg, f'{p!r} not in {msg!r}'


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_bad_magic(tmp_path, suffix):
  payload = bytearray(idx_bytes(np.zeros((2, 2))))
  payload[0] = 0x1F
  p = write(tmp_path / f'bad{suffix}', bytes(payload))
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p, 'magic')


def test_empty_file(tmp_path):
  p = write(tmp_path / 'empty', b'')
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


def test_wrong_element_type(tmp_path):
  p = write(tmp_path / 'floats', idx_bytes(np.zeros((2, 2)), type_code=0x0D))
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_truncated_data(tmp_path, suffix):
  payload = idx_bytes(np.ones((4, 5, 5)))
  p = write(tmp_path / f'short{suffix}', payload[:-7])
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


def test_trailing_garbage(tmp_path):
  p = write(tmp_path / 'long', idx_bytes(np.ones((4, 5))) + b'\x01\x02')
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


def test_truncated_header(tmp_path):
  p = write(tmp_path / 'header', idx_bytes(np.ones((4, 5, 5)))[:9])
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


def test_truncated_gzip_stream(tmp_path):
  good = tmp_path / 'good.gz'
  write(good, idx_bytes(np.random.RandomState(0).randint(0, 256, (50, 20, 20))))
  raw = good.read_bytes()
  p = write(tmp_path / 'cut.gz', b'')
  with open(p, 'wb') as f:
    f.write(raw[: len(raw) // 2])
  with pytest.raises(DatasetError) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


def test_label_count_mismatch(tmp_path):
  make_idx_dir(tmp_path)
  labels = tmp_path / datasets.IDX_FILES['test_labels']
  write(labels, idx_bytes(np.zeros(5)))  # 5 labels for 3 images
  with pytest.raises(DatasetError) as e:
    datasets.load_idx(str(tmp_path))
  _assert_names(e, labels)


def test_images_not_3d(tmp_path):
  make_idx_dir(tmp_path)
  images = tmp_path / datasets.IDX_FILES['train_images']
  write(images, idx_bytes(np.zeros((7, 20))))
  with pytest.raises(DatasetError) as e:
    datasets.load_idx(str(tmp_path))
  _assert_names(e, images)


@pytest.mark.parametrize('key', list(datasets.IDX_FILES))
def test_missing_file_names_the_path(tmp_path, key):
  make_idx_dir(tmp_path)
  os.remove(tmp_path / datasets.IDX_FILES[key])
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset(f'idx:{tmp_path}')
  _assert_names(e, os.path.join(str(tmp_path), datasets.IDX_FILES[key]))


def test_read_idx_missing_path(tmp_path):
  p = str(tmp_path / 'nope')
  with pytest.raises((FileNotFoundError, DatasetError)) as e:
    datasets.read_idx(p)
  _assert_names(e, p)


def test_nonexistent_idx_dir(tmp_path):
  """A missing dataset is an error naming its path, and a command's one-line end (no traceback)."""
  p = str(tmp_path / 'no-such-dir')
  with pytest.raises(DatasetError) as e:
    datasets.load_dataset(f'idx:{p}')
  _assert_names(e, p)
  assert cli.failure_message(e.value) == f'error: {e.value}'


# ------------------------------------------------------------------ digits and TFDS


def test_digits():
  ds = datasets.load_dataset('digits')
  assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.train_images.max() == 255 and ds.num_classes == 10
  assert set(np.unique(ds.test_labels)) == set(range(10))
  from sklearn.datasets import load_digits

  d = load_digits()
  # Every image is a rescaled sklearn image with its label.
  ref = {tuple(np.round(im * 255 / 16).astype(np.uint8).ravel()): int(t) for im, t in zip(d.images, d.target)}
  for img, lab in zip(ds.test_images[:40], ds.test_labels[:40]):
    assert ref[tuple(img.ravel())] == lab


@pytest.mark.parametrize('name,shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_tfds_mocked(name, shape):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = datasets.load_dataset(name)
  assert ds.train_images.shape == (6,) + shape and ds.test_images.shape == (6,) + shape
  assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
  assert ds.train_labels.shape == (6,) and ds.train_labels.dtype == np.int32
  assert ds.num_classes == 10
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
  assert ds.input_shape == shape
  # A run config's data section (data.pad_to=0: no padding) reads the same images.
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    configured = datasets.load_for(config.from_dict({'data.name': name, 'data.pad_to': 0}).data)
  assert configured.input_shape == shape
  np.testing.assert_array_equal(configured.train_images, ds.train_images)
  np.testing.assert_array_equal(configured.test_labels, ds.test_labels)


def test_tfds_unknown_dataset_raises_dataset_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(DatasetError):
    datasets.load_dataset('no_such_dataset_xyz', data_dir=str(tmp_path))


# ------------------------------------------------------------------ padding (data.pad_to)


def test_pad_images_28_to_32_centres_the_original():
  x = np.random.RandomState(0).randint(1, 256, (5, 28, 28, 1)).astype(np.uint8)  # no zeros inside
  out = datasets.pad_images(x, 32)
  expected = np.zeros((5, 32, 32, 1), np.uint8)
  expected[:, 2:30, 2:30, :] = x
  assert out.dtype == np.uint8 and out.shape == (5, 32, 32, 1)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(out[:, 2:30, 2:30], x)
  assert (out == 0).sum() == 5 * (32 * 32 - 28 * 28)  # exactly the border is black
  assert datasets.pad_images(x, 28) is x  # already that size: unchanged


def test_pad_images_odd_difference_puts_the_extra_pixel_below_and_right():
  x = np.random.RandomState(1).randint(1, 256, (2, 8, 6, 3)).astype(np.uint8)
  out = datasets.pad_images(x, 11)  # 3 rows: 1 above, 2 below; 5 columns: 2 left, 3 right
  expected = np.zeros((2, 11, 11, 3), np.uint8)
  expected[:, 1:9, 2:8, :] = x
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('shape', [(2, 36, 36, 1), (2, 28, 36, 1), (2, 36, 28, 1)])
def test_pad_images_refuses_larger_images(shape):
  with pytest.raises(SettingsError, match=rf'{shape[1]}x{shape[2]} images to 32x32'):
    datasets.pad_images(np.zeros(shape, np.uint8), 32)


def test_pad_dataset_and_channel_stats(fashion_mnist):
  small = datasets.subset(fashion_mnist, train=200, test=30, seed=0)
  padded = datasets.pad_dataset(small, 32)
  assert padded.input_shape == (32, 32, 1) and padded.test_images.shape == (30, 32, 32, 1)
  np.testing.assert_array_equal(padded.train_labels, small.train_labels)
  assert datasets.pad_dataset(small, 0) is small  # 0: off
  # The statistics are the padded images': the same pixel sum over 32x32 instead of 28x28.
  np.testing.assert_allclose(padded.channel_stats()[0], np.array(small.channel_stats()[0]) * 784 / 1024, rtol=1e-9)
  with pytest.raises(SettingsError, match='28x28 images to 20x20'):
    datasets.pad_dataset(small, 20)


def test_pad_to_through_the_training_run_data_path():
  from stepnet_jax.training import run

  cfg = config.from_dict({'data.name': 'digits', 'data.pad_to': 12, 'train.batch_size': 32})
  dataset, validation, steps = run.prepare_splits(cfg)
  assert dataset.input_shape == (12, 12, 1) and dataset.test_images.shape[1:] == (12, 12, 1)
  assert validation is None and steps == len(dataset.train_labels) // 32
  assert (dataset.train_images[:, :2] == 0).all() and (dataset.train_images[:, 10:] == 0).all()
  original = datasets.load_digits()
  np.testing.assert_array_equal(dataset.train_images[:, 2:10, 2:10], original.train_images)


def test_pad_to_is_checked_by_the_config():
  assert config.Config().data.pad_to == 0
  with pytest.raises(SettingsError, match='data.pad_to must be >= 0'):
    config.from_dict({'data.pad_to': -1})


def test_a_study_pads_once_for_every_method():
  """A study's common section may pad; a method's overrides may not (the images are loaded once)."""

  @dataclasses.dataclass(frozen=True)
  class Study:
    common: config.Config = config.Config()
    method: config.Overrides = dataclasses.field(default_factory=config.Overrides)

  assert config.study_config(Study, {'common': {'data': {'pad_to': 32}}}).common.data.pad_to == 32
  with pytest.raises(SettingsError, match='set once for every method'):
    config.study_config(Study, {'method': {'data': {'pad_to': 32}}})
