"""eval.backend's config rules and its one-line errors (run in any venv, with or without vLLM)."""
import importlib.util

import pytest

from refine_ray.cli import main
from refine_ray.config import ConfigError, EvalConfig, TTTConfig

TINY = ["--config", "configs/ttt_tiny_longbench.yaml", "--no-progress", "--max-prompt-tokens", "32",
        "--max-gen-tokens", "2", "--limit", "1"]


def test_backend_field_is_validated():
    with pytest.raises(ConfigError, match=r"^eval.backend: 'tgi' is not one of 'native', 'vllm'$"):
        EvalConfig(backend="tgi").validate("eval")
    with pytest.raises(ConfigError, match=r"^eval.backend: vllm answers without test-time training"):
        EvalConfig(backend="vllm", ttt=TTTConfig(mode="ntp")).validate("eval")
    EvalConfig(backend="vllm").validate("eval")       # no TTT: fine


def test_eval_refuses_ttt_and_unserved_models_in_one_line(shared_data, tmp_path, capsys):
    data = ["--data", str(shared_data / "longbench" / "trec_16384.parquet"), "--out", str(tmp_path / "r.json")]
    assert main(["eval", *TINY, "--model", "tiny:delta_net", "--ttt", "refine", *data, "eval.backend=vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.backend: vllm answers without test-time training" in err
    assert main(["eval", *TINY, "--model", "tiny:lact", *data, "eval.backend=vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.backend: vllm serves model types" in err and "'lact'" in err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_eval_without_vllm_says_how_to_install(shared_data, tmp_path, capsys):
    data = ["--data", str(shared_data / "longbench" / "trec_16384.parquet"), "--out", str(tmp_path / "r.json")]
    assert main(["eval", *TINY, "--model", "tiny:delta_net", *data, "eval.backend=vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.backend=vllm needs vLLM, which is not installed" in err
