"""Renders charts/meshid like `helm install` and prints the objects as one JSON list.

Run with the chart checks' venv (tests/helm/requirements.txt: helm-python-sdk, PyYAML):
    python render_chart.py RELEASE NAMESPACE VALUES_JSON
"""

import json
import os
import sys

import helm_python as helm
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "charts", "meshid")


def main():
    release, namespace, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects = []
    for path in sorted(files):
        if path.endswith((".yaml", ".yml")):
            objects.extend(d for d in yaml.safe_load_all(files[path]) if d)
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
