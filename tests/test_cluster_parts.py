"""The cluster's pure parts, without a Ray instance: placement ranks, the autoscaling rule,
the deployment as a Serve config (a replica count is a light update, other settings are a
redeploy), and flag checks."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("ray")

from specsplit.cluster.autoscale import desired_replicas  # noqa: E402
from specsplit.cluster.router import owner_name, ranks  # noqa: E402
from specsplit.cluster.spec import ClusterSpec, parse_autoscale  # noqa: E402
from specsplit.errors import ConfigError  # noqa: E402


def test_session_ids_name_their_replica():
    assert owner_name("kf3q8vz2.9a0b1c2d3e4f5a6b") == "kf3q8vz2"
    assert owner_name("9a0b1c2d3e4f5a6b") == ""  # a plain server's id
    assert owner_name("") == ""


def test_ranks_most_room_first_full_and_draining_last():
    room = {"a": 3, "b": 1, "c": 3, "d": 0, "e": -2, "f": 5}
    assert ranks(room, draining={"f"}) == [["a", "c"], ["b"], ["d", "e"], ["f"]]
    assert ranks({"a": 0}, set()) == [["a"]]  # every replica full: still one to refuse
    assert ranks({}, set()) == []


def test_desired_replicas_counts_open_sessions():
    assert desired_replicas({"r1": 30.0, "r2": 34.0}, target=16.0, current=2) == 4.0
    assert desired_replicas({"r1": 3.0}, target=16.0, current=2) == 3.0 / 16.0
    assert desired_replicas({}, target=16.0, current=2) == 2.0  # no report yet: keep


def spec(**kw) -> ClusterSpec:  # noqa: ANN003
    return ClusterSpec(server_factory="m:f", settings={"target": "t"}, **kw)


def test_a_replica_count_is_a_light_update_and_settings_a_redeploy():
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    def version(s: ClusterSpec) -> str:
        app = ServeDeploySchema.model_validate(s.serve_config()).applications[0]
        return get_app_code_version(app)

    base = spec(replicas=2)
    assert version(replace(base, replicas=1)) == version(base)
    assert version(replace(base, settings={"target": "other"})) != version(base)
    opts = base.serve_config()["applications"][0]["deployments"][0]
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] > base.max_sessions  # "server full" answers first
    assert opts["request_router_config"]["request_router_class"].endswith(":SessionRouter")


def test_autoscaling_config_scales_on_sessions():
    s = ClusterSpec.from_flags(
        server_factory="m:f",
        settings={},
        replicas=None,
        autoscale="1:4",
        target_sessions=None,
        max_sessions=64,
        threads=2,
        http_port=None,
    )
    opts = s.deployment_options()
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 4)
    assert auto["target_ongoing_requests"] == 32.0  # half of --max-sessions
    assert auto["policy"]["policy_function"].endswith(":sessions_policy")
    assert "num_replicas" not in opts and opts["ray_actor_options"]["num_cpus"] == 2.0


@pytest.mark.parametrize("text", ["2", "0:3", "3:2", "a:b", ":"])
def test_bad_autoscale_bounds(text):
    with pytest.raises(ConfigError, match="MIN:MAX"):
        parse_autoscale(text)


def test_secrets_stay_out_of_the_printed_spec():
    s = spec(secrets={"auth_token": "sk-secret-123", "keys": None})
    assert "sk-secret-123" not in str(s.as_dict())
