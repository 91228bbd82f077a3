"""`serve --replicas` flags and the deployments they make, without starting Ray."""

from __future__ import annotations

import argparse

import pytest

from llamaserve.config import EngineConfig
from llamaserve.server.replicas import (
    ReplicaPlan,
    add_replica_args,
    app_settings,
    deployments,
    ray_app,
    replica_plan,
)
from llamaserve.server.settings import ServerSettings

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'llamaserve[ray]')")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_replica_args(p)
    return p.parse_args(list(argv))


def test_no_replica_flag_is_the_single_process_server() -> None:
    assert replica_plan(_args()) is None
    plan = replica_plan(_args("--replicas", "3", "--num-cpus-per-replica", "2", "--no-prefix-routing"))
    assert plan == ReplicaPlan(replicas=3, num_cpus=2.0, prefix_routing=False)
    assert replica_plan(_args("--autoscale", "2:5")).replicas == 2  # starts at MIN


@pytest.mark.parametrize("argv", [["--autoscale", "5"], ["--autoscale", "a:b"]])
def test_bad_autoscale_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)


@pytest.mark.parametrize("kw", [{"replicas": 0}, {"autoscale": (3, 2)}, {"autoscale": (0, 2)},
                                {"num_cpus": -1.0}])
def test_plan_refuses_impossible_values(kw: dict) -> None:
    with pytest.raises(ValueError):
        ReplicaPlan(**kw)


def test_the_router_bound_is_the_replicas_own_queue_bound() -> None:
    config, settings = EngineConfig(max_num_seqs=8), ServerSettings(max_queue=32, drain_timeout=12)
    engine, ingress = deployments(ReplicaPlan(replicas=2, num_cpus=1, num_gpus=0.5), config, settings)
    c = engine._deployment_config
    assert c.num_replicas == 2 and c.max_ongoing_requests == 8 + 32 and c.max_queued_requests == 32
    assert c.graceful_shutdown_timeout_s == 12
    assert engine.ray_actor_options == {"num_cpus": 1, "num_gpus": 0.5}
    assert "PrefixAffinityRouter" in c.request_router_config.request_router_class
    auto, _ = deployments(ReplicaPlan(autoscale=(1, 4)), config, settings)
    a = auto._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 4, 8)
    assert ingress._deployment_config.num_replicas == 1
    assert ingress._deployment_config.user_config == {"prefix_routing": True}
    _, off = deployments(ReplicaPlan(prefix_routing=False), config, settings)
    assert off._deployment_config.user_config == {"prefix_routing": False}


def test_the_kuberay_builder_takes_known_args_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMASERVE_API_KEYS", "from-env")
    args = {"replicas": "2", "api_keys": ["k1"], "max_num_seqs": 4, "prefix_routing": "false"}
    plan, config, settings = app_settings(args)
    assert (plan.replicas, plan.prefix_routing, config.max_num_seqs) == (2, False, 4)
    assert settings.api_keys == ("k1", "from-env")
    assert type(ray_app(args)).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown llamaserve app args"):
        ray_app({"replicas": 2, "num_replica": 3})
