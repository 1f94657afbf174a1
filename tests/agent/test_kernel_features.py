"""Feature probing and degradation: an optional feature that the kernel lacks is switched off with a
reason (logged, and flowship_agent_kernel_feature says so), never a failed start."""

from __future__ import annotations

import dataclasses
import os

import pytest

from flowship.agent import btf, kernel_features, loader
from flowship.agent.capture import CaptureConfig, KernelCapture
from flowship.metrics import Metrics

pytestmark = pytest.mark.kernel

# kfree_skb tracepoint signatures (without the context pointer) as the kernels' BTF describes them
SIG_5_10 = ["ptr", "ptr"]  # (skb, location)
SIG_6_1 = ["ptr", "ptr", "enum skb_drop_reason"]  # 5.17+: + reason
SIG_6_12 = ["ptr", "ptr", "enum skb_drop_reason", "ptr"]  # 6.11+: + rx_sk


def test_kfree_skb_signatures() -> None:
    assert not kernel_features.kfree_skb_has_reason(None)
    assert not kernel_features.kfree_skb_has_reason(SIG_5_10)
    assert kernel_features.kfree_skb_has_reason(SIG_6_1)
    assert kernel_features.kfree_skb_has_reason(SIG_6_12)


def test_running_kernel_btf_describes_kfree_skb() -> None:
    if not btf.VMLINUX_BTF.exists():
        pytest.fail(f"{btf.VMLINUX_BTF} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y")
    args = btf.load().tracepoint_args("kfree_skb")
    assert args is not None and args[:2] == ["ptr", "ptr"], args
    assert btf.load().tracepoint_args("no_such_tracepoint_here") is None


def test_drops_reason_names_the_missing_argument() -> None:
    f = kernel_features.KernelFeatures(btf=True, kfree_skb_args=SIG_5_10)
    assert "no drop reason" in (f.drops_reason() or "")
    assert f.warnings() == [f"kernel drops are not reported: {f.drops_reason()}"]


@pytest.fixture()
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (loads the BPF object)")
    if not loader.DEFAULT_OBJECT.exists():
        pytest.fail(f"{loader.DEFAULT_OBJECT} is missing: build it with `make -C bpf`")


def test_kernel_without_drop_reasons_starts_without_drops(root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = kernel_features.check()
    if real.problems():
        pytest.fail("eBPF is not usable here:\n" + "\n".join(real.problems()))
    old_kernel = dataclasses.replace(real, tp_btf_kfree_skb=False, kfree_skb_args=SIG_5_10)
    monkeypatch.setattr(kernel_features, "check", lambda: old_kernel)
    with KernelCapture().start([], CaptureConfig(sweep_interval_s=None)) as cap:
        st = cap.feature_states["drops"]
        assert not st.enabled and "no drop reason" in st.detail
        with pytest.raises(OSError):  # not loaded at all: the object loaded without it
            _ = cap.program("fs_kfree_skb").fd
        assert cap.program("fs_tc_ingress").fd >= 0
        metrics = Metrics()
        kernel_features.publish(metrics, "agent", cap.feature_states)
        assert metrics.value("flowship_agent_kernel_feature", source="agent", feature="drops", mode=st.detail) == 0
        assert metrics.value("flowship_agent_kernel_feature", source="agent", feature="ringbuf", mode="ringbuf") == 1


def test_feature_states_on_this_kernel(root: None) -> None:
    with KernelCapture().start([], CaptureConfig(sweep_interval_s=None)) as cap:
        states = cap.feature_states
        assert states["drops"].enabled, states["drops"]
        assert states["attach"].detail in ("tcx", "tc")
        assert all(states[k].enabled for k in ("btf", "ringbuf", "sweep", "l7")), states
