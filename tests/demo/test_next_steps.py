"""What `make demo` prints after its report: where its picture and report are, and commands that run as printed."""
import json
import os
import shlex

from absl import flags

from dalle_jax.demo import stages as demo
from dalle_jax.inference import sample
from dalle_jax.shapes import evaluate_samples


def _demo_outputs(root):
    """The files and work directories the demo leaves in `root` (their contents do not matter here)."""
    for name in ("vqgan", "dalle", "reranker"):
        (root / name).mkdir(parents=True)
    for name in (demo.SAMPLES_FILE, demo.REPORT_FILE, demo.JUDGED_FILE, os.path.join("dalle", "reranker.json")):
        (root / name).write_text("{}")


def _commands(message: str) -> dict[str, list[str]]:
    lines = [shlex.split(line) for line in message.splitlines() if line.strip().startswith("dalle-jax-")]
    return {words[0]: words[1:] for words in lines}


def test_the_printed_paths_exist_and_the_commands_parse(tmp_path, monkeypatch):
    root = tmp_path / "runs" / "demo"
    _demo_outputs(root)
    monkeypatch.chdir(tmp_path)  # the demo's root as `make demo` names it, relative to where it ran
    message = demo.next_steps("runs/demo", 500)
    # Every path the text (not a command, whose --out it makes) names is there.
    text = [line for line in message.splitlines() if not line.strip().startswith("dalle-jax-")]
    named = {word.strip("():,") for line in text for word in line.split() if word.startswith(("runs/", "(runs/"))}
    assert {f"runs/demo/{demo.SAMPLES_FILE}", f"runs/demo/{demo.REPORT_FILE}", "runs/demo/dalle/reranker.json",
            "runs/demo/reranker"} <= named
    assert all(os.path.exists(path) for path in named), named
    commands = _commands(message)
    assert set(commands) == {"dalle-jax-sample", "dalle-jax-evaluate", "dalle-jax-train"}
    # The sample and evaluate commands are accepted by their flags, with the demo's seq2seq run.
    for module, name in ((sample, "dalle-jax-sample"), (evaluate_samples, "dalle-jax-evaluate")):
        fv = flags.FlagValues()
        module.define_flags(fv)
        fv([name, *commands[name]])
        assert fv.workdir == "runs/demo/dalle" and os.path.isdir(fv.workdir)
        assert fv.reranker_workdir == ("" if name == "dalle-jax-evaluate" else None)
    assert "--config" in commands["dalle-jax-train"] and "images_vqgan" in commands["dalle-jax-train"]


def test_main_prints_the_report_then_the_next_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_demo", lambda root, max_examples, seed: {"root": root, "judged": max_examples,
                                                                           "seed": seed})
    monkeypatch.setattr(demo, "_ROOT", type("Flag", (), {"value": str(tmp_path)}))
    monkeypatch.setattr(demo, "_MAX_EXAMPLES", type("Flag", (), {"value": 7}))
    monkeypatch.setattr(demo, "_SEED", type("Flag", (), {"value": 3}))
    demo.main(["demo"])
    printed = capsys.readouterr().out
    report_end = printed.index("}\n") + 2
    assert json.loads(printed[:report_end]) == {"root": str(tmp_path), "judged": 7, "seed": 3}
    assert printed[report_end:].rstrip("\n") == demo.next_steps(str(tmp_path), 7)
    assert f"--workdir {os.path.join(str(tmp_path), 'dalle')}" in printed



def test_it_says_how_to_reach_the_commands_only_when_they_are_not_on_the_path(tmp_path, monkeypatch):
    _demo_outputs(tmp_path / "demo")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "activate` first" in demo.next_steps(str(tmp_path / "demo"), 500)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dalle-jax-sample").write_text("#!/bin/sh\n")
    (bin_dir / "dalle-jax-sample").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "activate` first" not in demo.next_steps(str(tmp_path / "demo"), 500)
