"""Issue 29: noise placement is one object per placement (privacy/modes/placement.py), and SecAgg+ a
wrapper around a mode (privacy/modes/secure.py), reachable as `mode.secagg` only under secure aggregation."""

from __future__ import annotations

import pytest
from harness import tiny_config

from fl_dplora.privacy import modes
from fl_dplora.privacy.modes.placement import CENTRAL, DISTRIBUTED, LOCAL, NONE
from fl_dplora.privacy.modes.secure import SecureAggregation


@pytest.mark.parametrize("dp_mode, noise, secure, placement", [
    ("none", "central", False, NONE), ("none", "central", True, NONE), ("sample", "central", False, NONE),
    ("client", "central", False, CENTRAL), ("client", "local", False, LOCAL), ("client", "central", True, CENTRAL),
    ("client", "distributed", True, DISTRIBUTED), ("paper", "central", False, LOCAL), ("paper", "local", False, LOCAL),
])
def test_each_mode_and_config_has_one_placement_and_a_wrapper_only_under_secagg(dp_mode, noise, secure, placement):
    mode = modes.for_config(tiny_config(dp_mode=dp_mode, client_noise=noise, secure_aggregation=secure, population=4))
    assert mode.placement is placement
    assert (mode.secagg is not None) is secure
    if secure:
        assert isinstance(mode.secagg, SecureAggregation) and mode.secagg.mode is mode
    if mode.client_level:
        assert mode.describe()["noise_placement"] == placement.adds_noise
        assert mode.describe()["secure_aggregation"] is secure


def test_placement_answers_what_callers_ask():
    assert [p.node_noise_faces_server for p in (NONE, CENTRAL, LOCAL, DISTRIBUTED)] == [False, False, True, True]
    assert [p.server_sees_noised_updates for p in (NONE, CENTRAL, LOCAL, DISTRIBUTED)] == [False, False, True, False]
    assert [p.node_shares for p in (NONE, CENTRAL, LOCAL, DISTRIBUTED)] == [False, False, False, True]


def test_no_mode_carries_the_old_flags_or_secagg_methods():
    for cls in modes.MODES.values():
        mode = cls(tiny_config(dp_mode=cls.name, population=4))
        for old in ("local_noise", "distributed_noise", "secure", "secagg_plan", "secure_update", "aggregate_secure_sum",
                    "secagg_describe", "secagg_setup_refusal", "check_secagg_delta", "secagg_delta_extra"):
            assert not hasattr(mode, old), (cls.name, old)


@pytest.mark.parametrize("dp_mode, noise", [("none", "central"), ("client", "central"), ("client", "distributed")])
def test_under_secagg_the_plain_client_update_refuses(dp_mode, noise):
    """The plain path would hand SecAgg+ an update off its grid and without the node's noise share
    (review of ecff81f): under secure aggregation only mode.secagg.client_update may build it."""
    import torch

    mode = modes.for_config(tiny_config(dp_mode=dp_mode, client_noise=noise, secure_aggregation=True, population=4))
    delta = {"x.lora_B.weight": torch.ones(4)}
    with pytest.raises(RuntimeError, match="mode.secagg.client_update"):
        mode.client_update(delta, 1.0, torch.Generator().manual_seed(0))
    out = mode.secagg.client_update(delta, 1.0, torch.Generator().manual_seed(0))
    assert set(out) == set(delta)
    plain = modes.for_config(tiny_config(dp_mode=dp_mode, client_noise="central", population=4))
    assert set(plain.client_update(delta, 1.0, torch.Generator().manual_seed(0))) == set(delta)  # no secagg: allowed


def test_the_configs_dp_mode_choices_are_the_registry_of_modes():
    """config/schema.py cannot import privacy/ (privacy imports config), so a new mode is named in both:
    its class in MODES and its name in DP_MODES; this keeps the two lists one."""
    from fl_dplora.config import DP_MODES, SCHEMA

    assert tuple(modes.MODES) == DP_MODES == SCHEMA["dp-mode"].choices
    assert all(name == cls.name for name, cls in modes.MODES.items())
