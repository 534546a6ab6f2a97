"""Which reported instances a worker must stop (``stale_instances``, pure): a killed
app's old instances, never the instances of a transition in flight."""

from __future__ import annotations

from types import SimpleNamespace

from hotwire.master.membership import stale_instances
from hotwire.plan import PEPlacement
from hotwire.proto import hotwire_pb2 as pb


def _app(state: str, epoch: int) -> SimpleNamespace:
    placement = {"src": PEPlacement(epoch, "b", ("w1",)), "out": PEPlacement(epoch, "b", ("w2",))}
    return SimpleNamespace(state=state, epoch=epoch, placement=placement)


def _stale(app: SimpleNamespace, *instances: str, worker: str = "w1") -> list[str]:
    running = [pb.RunningInstance(app="a", instance=i) for i in instances]
    return [r.instance for r in stale_instances(worker, running, {"a": app})]


def test_a_killed_apps_instances_are_stale_but_not_those_of_its_new_submit() -> None:
    # "a" was killed at epoch 7; its name is submitted again: the submit's instances
    # (generation 8) run before it commits and must be left to it. Stopping them
    # (as happened when a heartbeat came during the resubmit) left the new app stuck.
    killed = _app("killed", 7)
    assert _stale(killed, "src@7.0", "src@8.0", "out@8.0") == ["src@7.0"]


def test_a_running_apps_instances_not_placed_here_are_stale() -> None:
    running = _app("running", 3)
    assert _stale(running, "src@3.0", "out@3.0", "src@2.0", "src@4.0") == ["out@3.0", "src@2.0"]
    assert _stale(running, "out@3.0", worker="w2") == []
