"""Learning-rate schedules: every step-decay boundary applies, warm-up or not."""

import pytest

from cnnlab import configs
from cnnlab.training import optim


def _step_schedule(warmup_epochs: float, num_epochs: int, steps_per_epoch: int = 10):
  opt = configs.base_config().optimizer
  opt.schedule = "step"
  opt.warmup_epochs = warmup_epochs
  total = num_epochs * steps_per_epoch
  return opt, optim.learning_rate_schedule(opt, steps_per_epoch, total), total


@pytest.mark.parametrize("num_epochs", [1, 2, 4])
def test_every_step_boundary_applies_even_inside_warmup(num_epochs):
  opt, schedule, total = _step_schedule(warmup_epochs=1.0, num_epochs=num_epochs)
  decays = opt.step_factor ** len(opt.step_boundaries)
  assert float(schedule(total - 1)) == pytest.approx(opt.learning_rate * decays)


def test_boundary_inside_warmup_scales_the_warmup_target():
  # 2 epochs of 10 steps, 1 warm-up epoch: boundary 0.5 (step 10) ends the warm-up, 0.75 is
  # step 15. The warm-up ramps to lr * factor; the second boundary applies at step 15.
  opt, schedule, _ = _step_schedule(warmup_epochs=1.0, num_epochs=2)
  lr, factor = opt.learning_rate, opt.step_factor
  assert float(schedule(5)) == pytest.approx(0.5 * lr * factor)
  assert float(schedule(10)) == pytest.approx(lr * factor)
  assert float(schedule(14)) == pytest.approx(lr * factor)
  assert float(schedule(15)) == pytest.approx(lr * factor ** 2)


def test_step_boundaries_after_warmup_and_coinciding_boundaries():
  opt, schedule, _ = _step_schedule(warmup_epochs=0.0, num_epochs=4)
  lr, factor = opt.learning_rate, opt.step_factor
  assert [float(schedule(s)) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx(
      [lr, lr, lr * factor, lr * factor, lr * factor ** 2, lr * factor ** 2])
  opt.step_boundaries = (0.5, 0.5)   # Both at step 20: they multiply.
  schedule = optim.learning_rate_schedule(opt, 10, 40)
  assert float(schedule(20)) == pytest.approx(lr * factor ** 2)
