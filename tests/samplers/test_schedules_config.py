"""Schedules, config defaults and validation (ValueError naming the offending value)."""

import dataclasses

import pytest
import torch
from flowdps.samplers import (
    ConfigError,
    FlowChefConfig,
    FlowDPSConfig,
    Schedule,
    check_sigmas,
    measurement_loss,
)
from flowdps.samplers.schedules import FLOWDPS_T_END, flowdps_sigmas, resolve
from flowdps.samplers.testing import shifted_sigmas


def test_schedule_constant_and_linear():
    assert [Schedule(2.5).at(i, 4) for i in range(4)] == [2.5] * 4
    ramp = Schedule(30.0, 5.0)
    assert ramp.at(0, 6) == 30.0
    assert ramp.at(5, 6) == 5.0
    assert ramp.at(2, 6) == pytest.approx(20.0)
    assert ramp.at(0, 1) == 30.0                      # one step: the start value
    assert resolve(7.0, 3, 10) == 7.0
    assert resolve(ramp, 5, 6) == 5.0
    with pytest.raises(ValueError, match="step 6"):
        ramp.at(6, 6)
    with pytest.raises(ValueError, match="nan"):
        Schedule(float("nan"))


def test_schedule_errors_name_the_field():
    """``Schedule.end`` in its own message; ``end`` for a caller (a node) to rename to its input."""
    with pytest.raises(ConfigError, match=r"^Schedule\.end must be finite, got nan$") as info:
        Schedule(15.0, float("nan"))
    assert info.value.field == "end"
    assert info.value.message("step_size_end") == "step_size_end must be finite, got nan"
    with pytest.raises(ConfigError, match=r"^step_size must be >= 0.0 at every step, got -1.0$") as info:
        FlowDPSConfig(step_size=-1.0)
    assert info.value.field == "step_size"


def test_defaults_are_the_papers():
    config = FlowDPSConfig()
    assert (config.dc_steps, config.step_size, config.blend, config.noise_mixing) == (3, 15.0, "paper", "paper")
    assert FlowChefConfig().step_size == 15.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.step_size = 1.0
    assert config.blend_weight(0.7, 0, 28) == 0.7                  # w = s
    assert config.noise_weights(0.36, 0, 28) == (0.6, 0.8)        # sqrt(s'), c = sqrt(1 - s')
    assert FlowDPSConfig(blend="full").blend_weight(0.7, 0, 28) == 1.0
    assert FlowDPSConfig(blend=Schedule(1.0, 0.0)).blend_weight(0.7, 27, 28) == 0.0
    assert FlowDPSConfig(noise_mixing=Schedule(1.0, 0.0)).noise_weights(0.36, 27, 28) == (1.0, 0.0)


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: FlowDPSConfig(step_size=-1.5), "step_size.*-1.5"),
    (lambda: FlowDPSConfig(step_size=Schedule(10.0, -2.0)), "step_size.*-2.0"),
    (lambda: FlowDPSConfig(dc_steps=0), "dc_steps.*0"),
    (lambda: FlowDPSConfig(dc_steps=2.5), "dc_steps.*2.5"),
    (lambda: FlowDPSConfig(blend="sometimes"), "blend.*sometimes"),
    (lambda: FlowDPSConfig(blend=1.5), "blend.*1.5"),
    (lambda: FlowDPSConfig(noise_mixing=Schedule(0.5, -0.1)), "noise_mixing.*-0.1"),
    (lambda: FlowDPSConfig(noise_mixing="full"), "noise_mixing.*full"),
    (lambda: FlowChefConfig(step_size=-0.5), "step_size.*-0.5"),
    (lambda: FlowChefConfig(step_size=float("inf")), "step_size.*inf"),
])
def test_config_validation(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(("sigmas", "match"), [
    (torch.tensor([1.0, 0.5, 0.7, 0.0]), r"non-increasing.*0\.7"),
    (torch.tensor([1.0, 0.0, 0.0]), "only the last sigma may be 0"),
    (torch.tensor([1.5, 0.0]), r"\[0, 1\].*1\.5"),
    (torch.tensor([1.0, -0.1]), r"\[0, 1\].*-0\.1"),
    (torch.tensor([1.0]), r"at least 2 values.*\(1,\)"),
    (torch.ones(2, 2), r"1-D.*\(2, 2\)"),
])
def test_sigma_validation(sigmas, match):
    with pytest.raises(ValueError, match=match):
        check_sigmas(sigmas)


def test_sigma_rounding_and_partial_schedules():
    assert check_sigmas(torch.tensor([1.00001, 0.5, 0.0])) == [1.0, 0.5, 0.0]
    assert check_sigmas(torch.tensor([0.6, 0.3, 0.1])) == pytest.approx([0.6, 0.3, 0.1])
    assert check_sigmas(torch.tensor([0.5, 0.5, 0.0])) == [0.5, 0.5, 0.0]   # repeated levels are allowed


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"norm": "squared", "sigma_y": 0.0}, "sigma_y.*0.0"),
    ({"norm": "squared", "sigma_y": -0.03}, "sigma_y.*-0.03"),
    ({"norm": "squared"}, "sigma_y=None"),
    ({"norm": "l1"}, "norm.*l1"),
])
def test_data_term_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measurement_loss(None, lambda x: x, torch.zeros(1, 3), **kwargs)


@pytest.mark.parametrize("n_steps", [1, 8, 28])
def test_flowdps_sigmas_match_the_diffusers_sd3_scheduler(n_steps):
    """The official grid is diffusers' flow-matching Euler scheduler as configured for SD3 (shift 3, 1000
    training levels) with the shift set to 4 before its timesteps are made, plus the final 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_shift(4.0)
    scheduler.set_timesteps(n_steps)
    expected = scheduler.sigmas.double()
    ours = flowdps_sigmas(n_steps)
    assert ours.dtype == torch.float64
    assert ours.shape == (n_steps + 1,)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)   # diffusers computes in float32
    assert float(ours[0]) == 1.0
    assert float(ours[-1]) == 0.0


def test_flowdps_sigmas_end_where_the_paper_grid_ends():
    s = flowdps_sigmas(28)
    assert float(s[-2]) == pytest.approx(4 * FLOWDPS_T_END / (1 + 3 * FLOWDPS_T_END), rel=1e-12)
    assert float(s[-2]) == pytest.approx(0.011869, abs=1e-6)
    assert bool((s[1:] < s[:-1]).all())
    assert flowdps_sigmas(8, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        flowdps_sigmas(0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        flowdps_sigmas(8, shift=0.0)


def test_shifted_sigmas_dtype():
    assert shifted_sigmas(4, 3.0).dtype == torch.float64
    assert shifted_sigmas(4, 3.0, dtype=torch.float32).dtype == torch.float32
    torch.testing.assert_close(shifted_sigmas(4, 3.0).float(), shifted_sigmas(4, 3.0, dtype=torch.float32))
