import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from orchestrator.core.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_file():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    tree = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(tree, schema)
    assert tree["provider"]["type"] == "aws"
    types = tree["available_node_types"]
    assert types["trn2_prefill"]["node_config"]["InstanceType"] == "trn2.48xlarge"
    assert types["trn2_prefill"]["resources"]["neuron_cores"] > 0
    assert types["cs3_decode"]["resources"]["cs3"] >= 1


def test_orchestrator_settings_load_from_metadata():
    cfg = load_config(ROOT / "cluster.yaml")
    assert cfg.prefill.workers >= 1 and cfg.decode.workers >= 1
    assert cfg.local_resources["neuron_cores"] >= 1 and cfg.local_resources["cs3"] >= 1
    assert cfg.default_sla_class in cfg.sla_classes
    assert cfg.frontend.host == "127.0.0.1" and cfg.decode.kv_host == "127.0.0.1"
    assert cfg.frontend.metrics_port == 9400
    assert cfg.workload.trace.is_file()


def test_the_sla_router_is_the_default_and_the_replay_rate_follows_the_host():
    cfg = load_config(ROOT / "cluster.yaml")
    assert cfg.router_policy == "sla" and cfg.router_quantile == 0.9
    assert cfg.workload.target_rate is None and cfg.workload.capacity_fraction == 0.6  # auto: 0.6 x capacity
    prios = {n: s.priority for n, s in cfg.sla_classes.items()}
    assert prios["interactive"] > prios["standard"] > prios["batch"]
    tree = _tree()
    tree["metadata"]["workload"]["target_rate"] = 1.5  # an explicit rate still wins
    del tree["metadata"]["router"]
    cfg = parse_config(tree, Path("cluster.yaml"))
    assert cfg.workload.target_rate == 1.5 and cfg.router_policy == "sla"


def test_metrics_port_null_turns_the_endpoint_off():
    tree = _tree()
    tree["metadata"]["frontend"]["metrics_port"] = None
    assert parse_config(tree, Path("cluster.yaml")).frontend.metrics_port is None


def test_the_openai_door_listens_on_8000_unless_http_port_is_null():
    assert load_config(ROOT / "cluster.yaml").frontend.http_port == 8000
    tree = _tree()
    tree["metadata"]["frontend"]["http_port"] = None
    assert parse_config(tree, Path("cluster.yaml")).frontend.http_port is None
    del tree["metadata"]["frontend"]["http_port"]
    assert parse_config(tree, Path("cluster.yaml")).frontend.http_port == 8000


def _tree():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.mark.parametrize("mutate,key", [
    (lambda t: t["metadata"]["pools"]["decode"].update(workers=0), "metadata.pools.decode.workers"),
    (lambda t: t["metadata"]["pools"]["prefill"].update(workers="two"), "metadata.pools.prefill.workers"),
    (lambda t: t["metadata"]["router"].update(policy="fastest"), "metadata.router.policy"),
    (lambda t: t["metadata"].pop("pools"), "metadata.pools"),
    (lambda t: t["metadata"]["sla_classes"]["interactive"].update(ttft_ms=-5), "metadata.sla_classes.interactive.ttft_ms"),
    (lambda t: t["metadata"].update(default_sla_class="gold"), "metadata.default_sla_class"),
    (lambda t: t["metadata"]["pools"]["decode"].update(kv_host="decode-node"), "metadata.pools.decode.kv_host"),
    (lambda t: t["metadata"]["frontend"].update(metrics_port=70000), "metadata.frontend.metrics_port"),
    (lambda t: t["metadata"]["frontend"].update(metrics_port="9400"), "metadata.frontend.metrics_port"),
    (lambda t: t["metadata"]["frontend"].update(http_port=65536), "metadata.frontend.http_port"),
    (lambda t: t["metadata"]["frontend"].update(http_port="8000"), "metadata.frontend.http_port"),
    (lambda t: t["metadata"]["frontend"].update(port=-1), "metadata.frontend.port"),
    (lambda t: t["metadata"]["frontend"].update(shutdown_grace_s=-1), "metadata.frontend.shutdown_grace_s"),
    (lambda t: t["metadata"]["router"].update(quantile=1.0), "metadata.router.quantile"),
    (lambda t: t["metadata"]["router"].update(local_prefill_chunk_tokens=-1),
     "metadata.router.local_prefill_chunk_tokens"),
    (lambda t: t["metadata"]["sla_classes"]["batch"].update(priority="low"), "metadata.sla_classes.batch.priority"),
    (lambda t: t["metadata"]["workload"].update(target_rate="fast"), "metadata.workload.target_rate"),
    (lambda t: t["metadata"]["workload"].update(target_rate=0), "metadata.workload.target_rate"),
])
def test_invalid_config_names_file_and_key(mutate, key):
    tree = _tree()
    mutate(tree)
    with pytest.raises(ConfigError) as e:
        parse_config(tree, Path("cluster.yaml"))
    assert str(e.value).startswith("cluster.yaml: ") and key in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_kv_address_advertises_the_node_ip_only_for_a_wildcard_bind():
    from orchestrator.serving.pools import kv_address

    def no_lookup():
        raise AssertionError("a concrete bind address needs no lookup")

    assert kv_address("127.0.0.1", 5051, no_lookup) == "127.0.0.1:5051"
    assert kv_address("0.0.0.0", 5051, lambda: "10.0.3.7") == "10.0.3.7:5051"
    assert kv_address("::", 5051, lambda: "fd00::7") == "[fd00::7]:5051"


def _with_tls(tmp_path, cert_text: str | None, key_text: str | None):
    tree = _tree()
    for name, text in (("tls_cert_file", cert_text), ("tls_key_file", key_text)):
        if text is not None:
            (tmp_path / f"{name}.pem").write_text(text)
            tree["metadata"]["frontend"][name] = f"{name}.pem"  # relative to the config's folder
    return parse_config(tree, tmp_path / "cluster.yaml")


CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def test_tls_files_load_relative_to_the_config(tmp_path):
    cfg = _with_tls(tmp_path, CERT, KEY)
    assert cfg.frontend.tls == ((tmp_path / "tls_cert_file.pem").resolve(), (tmp_path / "tls_key_file.pem").resolve())
    assert load_config(ROOT / "cluster.yaml").frontend.tls is None


@pytest.mark.parametrize("cert,key,field,reason", [
    (CERT, None, "tls_key_file", "required with tls_cert_file"),
    (None, KEY, "tls_cert_file", "required with tls_key_file"),
    ("not a certificate", KEY, "tls_cert_file", "not a PEM file"),
    (CERT, CERT, "tls_key_file", "not a PEM file"),
])
def test_tls_misconfiguration_names_the_key(tmp_path, cert, key, field, reason):
    with pytest.raises(ConfigError, match=f"metadata.frontend.{field}: .*{reason}"):
        _with_tls(tmp_path, cert, key)


def test_an_unreadable_tls_file_names_the_key(tmp_path):
    tree = _tree()
    tree["metadata"]["frontend"].update(tls_cert_file="missing.pem", tls_key_file="missing-key.pem")
    with pytest.raises(ConfigError, match="metadata.frontend.tls_cert_file: cannot read"):
        parse_config(tree, tmp_path / "cluster.yaml")


def test_sla_classes_are_sla_targets_and_the_router_policies_are_one_list():
    from orchestrator.core.router import POLICIES, Router
    from orchestrator.core.sla import SLATarget

    cfg = load_config(ROOT / "cluster.yaml")
    assert cfg.sla_classes and all(type(s) is SLATarget and s.sla_class == name for name, s in cfg.sla_classes.items())
    for policy in POLICIES:  # every policy the router knows is accepted by the config, and the reverse
        tree = _tree()
        tree["metadata"]["router"]["policy"] = policy
        assert Router(parse_config(tree, Path("cluster.yaml")).router_policy).policy == policy
    tree = _tree()
    tree["metadata"]["router"]["policy"] = "fastest"
    with pytest.raises(ConfigError) as e:
        parse_config(tree, Path("cluster.yaml"))
    assert str(e.value) == f"cluster.yaml: metadata.router.policy: unknown policy 'fastest'; choose one of {', '.join(POLICIES)}"
