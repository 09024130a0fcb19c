"""The baseline registry: config parsing stays light, and every entry is complete and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bts.baselines import registry
from bts.baselines.registry import BASELINE_LR, BASELINES, REPORT_ROWS, enabled_systems
from bts.config import BaselinesConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "bts.baselines.btx",
    "bts.baselines.bam",
    "bts.baselines.merges",
    "bts.baselines.routing",
    "bts.baselines.btm",
    "mergekit",
    "transformers.models.mixtral.modeling_mixtral",
)


def test_parsing_a_config_imports_no_baseline_code():
    script = (
        "import json, sys\n"
        "from bts.config import load_config\n"
        f"load_config({str(ROOT / 'configs' / 'demo.yaml')!r})\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_report_rows_are_the_merges_then_the_papers_table_3_order():
    assert REPORT_ROWS == (
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "btm",
        "expert_routing",
        "btx_soft",
        "btx_top1",
        "btx_top2",
        "btx",
        "bam",
        "bam_adapters",
    )


def test_config_keys_are_the_yaml_format_in_its_order():
    assert list(BaselinesConfig.model_fields) == [
        "merges",
        "btx",
        "btx_variants",
        "btx_train",
        "btm",
        "expert_routing",
        "routing_train",
        "bam",
        "bam_adapters",
        "bam_train",
        "bam_adapters_train",
    ]


def test_names_belong_to_one_baseline_and_default_systems_to_theirs():
    names = [name for baseline in BASELINES for name in baseline.names]
    assert len(names) == len(set(names))
    systems = enabled_systems(BaselinesConfig())
    assert [s.name for s in systems] == [
        *("linear", "task_arithmetic", "ties", "dare_ties"),
        *("btx_soft", "btx_top1", "btx_top2"),
        *("btm", "expert_routing", "bam"),
    ]
    for system in systems:
        assert registry.owner(system.name) is system.baseline
    assert registry.aliases(BaselinesConfig()) == {"btx": "btx_top2"}


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: b.module.rsplit(".", 1)[-1])
def test_every_module_has_hooks_for_its_kind(baseline):
    hooks = baseline.hooks
    if baseline.kind is None:  # nothing built: assembled from the seed and experts
        assert hooks.assemble is not None and hooks.build is hooks.write is None
    else:
        assert hooks.load is not None and (hooks.build is None) != (hooks.write is None)
    assert set(baseline.rows) <= set(baseline.names) | set(baseline.aliases(BaselinesConfig()))


def test_each_system_gets_its_spec_schedule_and_learning_rate():
    config = parse_config(
        {
            "baselines": {
                "btx": {"train_all": False},
                "btx_variants": ["top1"],
                "routing_train": {"steps": 3},
                "bam_adapters": {"adapters": True, "train_all": False},
            }
        }
    ).baselines
    systems = {s.name: s for s in enabled_systems(config)}
    assert systems["btx_top1"].spec.routing == "top1" and systems["btx_top1"].lr is None
    assert systems["expert_routing"].schedule.steps == 3
    assert systems["expert_routing"].lr == BASELINE_LR["expert_routing"]
    assert systems["bam"].lr == BASELINE_LR["bam"]
    assert systems["bam_adapters"].lr == BASELINE_LR["bam_adapters"]
    assert systems["bam_adapters"].schedule is None
    assert registry.outputs(config)["expert_routing"] == "routing"
    assert "btm" not in registry.outputs(config)  # no directory: made when loaded
