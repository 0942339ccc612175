"""Per-example transforms: decoding, torchvision's crop arithmetic by hand, seeding, pickling."""

import io
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from cnnlab.base.errors import ConfigError
from cnnlab.data import transforms


class ScriptedRng:
  """Stands in for np.random.Generator: returns scripted draws and records the ranges asked."""

  def __init__(self, uniforms=(), integers=(), randoms=()):
    self.uniforms, self.integers_, self.randoms = list(uniforms), list(integers), list(randoms)
    self.asked = []

  def uniform(self, low, high):
    self.asked.append(("uniform", low, high))
    return self.uniforms.pop(0)

  def integers(self, low, high, size=None):
    self.asked.append(("integers", low, high, size))
    return self.integers_.pop(0)

  def random(self):
    return self.randoms.pop(0)


def _image(h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def _pil_resize(array, width, height):
  return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))


def test_random_resized_crop_follows_torchvision_get_params():
  # H=100, W=200. Draws: scale 0.5 -> target area 10,000; log-ratio 0 -> ratio 1 -> w = h = 100,
  # accepted; top from [0, 1), left from [0, 101): scripted 0 and 37.
  image = _image(100, 200)
  rng = ScriptedRng(uniforms=[0.5, 0.0], integers=[0, 37])
  assert transforms.random_resized_crop_box(100, 200, rng) == (0, 37, 100, 100)
  assert rng.asked == [("uniform", 0.08, 1.0), ("uniform", math.log(3 / 4), math.log(4 / 3)),
                       ("integers", 0, 1, None), ("integers", 0, 101, None)]
  out = transforms.random_resized_crop(image, 24, ScriptedRng([0.5, 0.0], [0, 37]))
  np.testing.assert_array_equal(out, _pil_resize(image[0:100, 37:137], 24, 24))


def test_random_resized_crop_falls_back_to_the_clamped_central_crop():
  # Every try: area 20,000 at ratio 4/3 -> w = round(163.3) = 163, h = round(122.5) = 122 > 100,
  # rejected. Fallback: W/H = 2 > 4/3, so h = 100, w = round(100 * 4/3) = 133, left = 67 // 2.
  rng = ScriptedRng(uniforms=[1.0, math.log(4 / 3)] * 10)
  assert transforms.random_resized_crop_box(100, 200, rng) == (0, 33, 100, 133)
  assert len(rng.asked) == 20 and not rng.uniforms
  # A tall image, W/H = 1/3 < 3/4 (each try: w = 75 > 50): w = 50, h = round(50 / (3/4)) = 67,
  # top = 83 // 2.
  rng = ScriptedRng(uniforms=[1.0, math.log(3 / 4)] * 10)
  assert transforms.random_resized_crop_box(150, 50, rng) == (41, 0, 67, 50)


def test_random_resized_crop_with_a_real_rng_stays_in_range():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = transforms.random_resized_crop_box(60, 90, rng)
    assert 0 < h and 0 < w and top + h <= 60 and left + w <= 90
    assert 0.08 * 0.7 <= h * w / (60 * 90) <= 1.0
  out = transforms.random_resized_crop(_image(60, 90, c=1), 16, rng)
  assert out.shape == (16, 16, 1) and out.dtype == np.uint8


def test_center_crop_of_a_300_by_200_image():
  # H=200, W=300, size 32: shorter side -> round(32 / 0.875) = round(36.57) = 37, longer side
  # int(37 * 300 / 200) = int(55.5) = 55; offsets round(5 / 2) = 2 and round(23 / 2) = 12 (Python
  # rounds halves to even, as torchvision's CenterCrop does).
  image = _image(200, 300)
  resized = transforms.resize_shorter(image, 37)
  assert resized.shape == (37, 55, 3)
  np.testing.assert_array_equal(resized, _pil_resize(image, 55, 37))
  np.testing.assert_array_equal(transforms.center_crop(image, 32), resized[2:34, 12:44])
  assert transforms.resize_shorter(image.transpose(1, 0, 2), 37).shape == (55, 37, 3)


def test_center_crop_upscales_small_images():
  out = transforms.center_crop(_image(20, 24), 32)   # shorter 20 -> 37, longer int(44.4) = 44
  np.testing.assert_array_equal(out, _pil_resize(_image(20, 24), 44, 37)[2:34, 6:38])


def test_shrinking_is_antialiased():
  # One-pixel checkerboard shrunk 8x: antialiased bilinear averages to grey; plain bilinear
  # sampling would give 0s and 255s.
  board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
  out = transforms.resize_shorter(board, 8)
  assert out.shape == (8, 8, 3) and 120 <= out.min() and out.max() <= 135


def test_cifar_crop_flip_equals_pad_and_slice():
  image = _image(32, 32)
  rng = ScriptedRng(integers=[np.array([1, 7])], randoms=[0.2])   # flip; dy = 1, dx = 7
  out = transforms.cifar_crop_flip(image, rng)
  assert rng.asked == [("integers", 0, 9, 2)]
  expected = np.pad(image[:, ::-1], ((4, 4), (4, 4), (0, 0)))[1:33, 7:39]
  np.testing.assert_array_equal(out, expected)
  # By hand: rows 0-2 are padding, so is the last 3 columns; the rest is the flipped image
  # shifted up-left by 3 pixels.
  assert not out[:3].any() and not out[:, -3:].any()
  np.testing.assert_array_equal(out[3:, :29], image[:29, ::-1][:, 3:])
  no_flip = transforms.cifar_crop_flip(image, ScriptedRng(integers=[np.array([4, 4])],
                                                          randoms=[0.7]))
  np.testing.assert_array_equal(no_flip, image)


def test_decode_gives_uint8_rgb_from_grey_rgba_palette_cmyk_and_jpeg():
  rgb = _image(12, 20)
  grey = rgb[:, :, 0]
  out = transforms.decode(_encode(Image.fromarray(grey), "PNG"))
  assert out.shape == (12, 20, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, -1))
  rgba = np.concatenate([rgb, np.full((12, 20, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(transforms.decode(_encode(Image.fromarray(rgba), "PNG")), rgb)
  palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  expected = np.asarray(palette.convert("RGB"))
  np.testing.assert_array_equal(transforms.decode(_encode(palette, "PNG")), expected)
  np.testing.assert_array_equal(
      transforms.decode(_encode(palette, "PNG", transparency=0)), expected)
  smooth = np.broadcast_to(np.linspace(0, 255, 20, dtype=np.uint8)[None, :, None], (12, 20, 3))
  jpeg = transforms.decode(_encode(Image.fromarray(np.ascontiguousarray(smooth)), "JPEG",
                                   quality=95))
  assert jpeg.shape == (12, 20, 3) and np.abs(jpeg.astype(int) - smooth).max() <= 8
  cmyk = transforms.decode(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"))
  assert cmyk.shape == (12, 20, 3) and cmyk.dtype == np.uint8
  assert transforms.decode(_encode(Image.fromarray(rgb), "PNG"), channels=1).shape == (12, 20, 1)


def test_decode_raises_value_error_on_bad_bytes():
  with pytest.raises(ValueError, match="not a readable image"):
    transforms.decode(b"not an image at all")
  truncated = _encode(Image.fromarray(_image(64, 64)), "JPEG")[:200]
  with pytest.raises(ValueError, match="not a readable image"):
    transforms.decode(truncated)


def test_example_rng_is_one_stream_per_seed_epoch_and_index():
  draw = lambda *key: transforms.example_rng(*key).integers(0, 2**62)
  keys = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (0, 0, 12345)]
  assert len({draw(*k) for k in keys}) == len(keys)
  assert draw(3, 4, 5) == draw(3, 4, 5)


@pytest.mark.parametrize("style, size, shape", [
    ("none", None, (40, 50, 3)), ("none", 24, (24, 24, 3)), ("cifar", None, (40, 50, 3)),
    ("cifar", 24, (24, 24, 3)), ("imagenet", 24, (24, 24, 3))])
def test_train_transforms_are_picklable_and_seeded(style, size, shape):
  image = _image(40, 50)
  transform = transforms.train_transform(style, size)
  copy = pickle.loads(pickle.dumps(transform))
  out = transform(image, transforms.example_rng(0, 1, 2))
  assert out.shape == shape and out.dtype == np.uint8
  np.testing.assert_array_equal(copy(image, transforms.example_rng(0, 1, 2)), out)
  outs = [transform(image, transforms.example_rng(0, 1, i)) for i in range(8)]
  assert (style == "none") == all(np.array_equal(o, outs[0]) for o in outs)


def test_eval_transform_ignores_rng_and_pickles():
  image = _image(40, 50)
  assert transforms.eval_transform(None)(image, None) is image
  transform = pickle.loads(pickle.dumps(transforms.eval_transform(24)))
  np.testing.assert_array_equal(transform(image, None), transforms.center_crop(image, 24))


def test_train_transform_rejects_unknown_styles_and_imagenet_without_size():
  with pytest.raises(ConfigError, match=r"dataset.augment='autoaugment' is not one of none, "):
    transforms.train_transform("autoaugment", 24)
  with pytest.raises(ConfigError, match="needs dataset.image_size"):
    transforms.train_transform("imagenet", None)
