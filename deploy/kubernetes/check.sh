#!/usr/bin/env bash
# CI's check of the Kubernetes manifests (docs/DESIGN.md#kubernetes), offline: every object
# validated strictly against the Kubernetes schemas (kubernetes-validate, from PyPI), the
# PrometheusRule equal to the promtool-tested rules, and the ConfigMap's turnpike.toml loaded by
# the binary ($1).
set -euo pipefail
cd "$(dirname "$0")"
bin=${1:?turnpike binary}
kubernetes-validate --strict --quiet config.yaml statefulset.yaml services.yaml disruption.yaml migrate-job.yaml
python3 monitoring/prometheusrule.py --check
python3 - "$bin" <<'PY'
import pathlib, subprocess, sys, tempfile, yaml
toml = yaml.safe_load(open("config.yaml"))["data"]["turnpike.toml"]
with tempfile.TemporaryDirectory() as d:
    p = pathlib.Path(d) / "turnpike.toml"
    p.write_text(toml)
    # healthcheck loads the configuration first: exit 2 is a configuration error; 1 (nothing
    # listens here) means it loaded.
    env = {"OPENAI_API_KEY": "sk-check", "TURNPIKE_SERVER__BIND": "127.0.0.1:1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.argv[1], "--config", str(p), "healthcheck", "--timeout-ms", "200"],
                       env=env, capture_output=True, text=True)
    if r.returncode != 1 or "not ready" not in r.stderr:
        sys.exit(f"the ConfigMap's turnpike.toml does not load: exit {r.returncode}: {r.stderr}")
PY
echo "kubernetes: 5 manifests valid, PrometheusRule in step with the rules, ConfigMap's configuration loads"
