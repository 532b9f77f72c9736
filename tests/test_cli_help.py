"""One command line: every `dit` subcommand's --help works, gives every flag a help text, shows
its description whole (never a docstring's first line cut mid-sentence), and, where the command has
settings, offers --params and --set and ends with the list of its settings; sample's old --output
still works, hidden and deprecated."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import pytest

from dit_core import settings
from pipelines import cli
from tests.conftest import REPO

# fields that a command takes from its own flags rather than from its params.yaml section
OWN_FLAGS = {"output": "--out", "prepared": "--prepared", "autoencoder": "--autoencoder", "latents": "--latents",
             "model": "--model"}
SENTENCE_END = (".", ":", ")", "!", "?")


def help_of(name: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, list]:
    """`dit <name> --help` in this process: exit code, what it printed, and every parser it built."""
    parsers: list[argparse.ArgumentParser] = []
    init = argparse.ArgumentParser.__init__

    def recording_init(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        parsers.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", recording_init)
    try:
        code = cli.main([name, "--help"])
    except SystemExit as e:   # `dit generate` parses in this process and exits as argparse does
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err, parsers


def description_block(text: str) -> list[str]:
    """The lines between the usage and the first section of argparse's help."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if not line.strip() and i > 0)  # the blank line after usage
    end = next(i for i, line in enumerate(lines) if line.endswith(":") and line.split()[0] in ("options:", "positional"))
    return [line for line in lines[start:end] if line.strip()]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_lists_every_flag_with_a_text_and_a_whole_description(name, capsys, monkeypatch):
    code, text, parsers = help_of(name, capsys, monkeypatch)
    assert code == 0, text
    shown = [p for p in parsers if p.format_help().strip() in text or p.description and p.description in text]
    if name == "local-cluster":   # no flags: its help is its docstring
        assert text.strip().endswith(".") and "dvc repro" in text
        return
    assert shown, f"dit {name} --help printed none of the parsers it built"
    for parser in shown:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            flag = (action.option_strings or [action.dest])[-1]
            if action.help == argparse.SUPPRESS:
                assert (name, flag) == ("sample", "--output"), f"dit {name}: {flag} is hidden from --help"
                continue
            assert action.help and action.help.strip(), f"dit {name}: {flag} has no help text"
            assert flag in text or action.dest in text, f"dit {name} --help does not list {flag}"
    split = [line for line in text.splitlines() if re.search(r"\w-$", line)]
    assert not split, f"dit {name} --help splits a word at its hyphen: {split}"
    block = description_block(text)
    assert block and block[-1].rstrip().endswith(SENTENCE_END), f"dit {name}: description cut: {block[-1:]}"


@pytest.mark.parametrize("name", sorted(n for n, c in cli.COMMANDS.items() if c.settings))
def test_commands_with_settings_take_params_and_set_and_list_them(name, capsys, monkeypatch):
    code, text, parsers = help_of(name, capsys, monkeypatch)
    assert code == 0, text
    flags = {f for p in parsers for a in p._actions for f in a.option_strings}
    assert {"--params", "--set"} <= flags, f"dit {name} lacks --params or --set"
    section = cli.COMMANDS[name].section
    assert f"settings (params.yaml section `{section}`" in text
    cls = cli._load(cli.COMMANDS[name].settings)
    hints = settings.field_types(cls)
    for f in dataclasses.fields(cls):
        listed = f"  {f.name} ({settings.type_name(hints[f.name])}): " in text
        assert listed or OWN_FLAGS.get(f.name) in flags, f"dit {name} --help shows neither the setting {f.name} nor its flag"
    # a required field is one of the command's own flags (--out, --latents): listing it as a setting
    # ("output (str): required") would send the user to params.yaml for it
    assert "): required" not in text


def test_python_m_job_help_shows_the_settings_list_too():
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "settings (params.yaml section `train`" in proc.stdout and "  lr (float): " in proc.stdout
    assert "--set" in proc.stdout and "--params" in proc.stdout


def test_sample_takes_out_and_still_the_deprecated_output(capsys):
    from ray_jobs.sample import parse_args

    assert parse_args(["--model", "m", "--out", "o"]).output == "o"
    assert "deprecated" not in capsys.readouterr().err
    assert parse_args(["--model", "m", "--output", "old"]).output == "old"
    err = capsys.readouterr().err
    assert "--output is deprecated" in err and "use --out" in err
    with pytest.raises(SystemExit):
        parse_args(["--model", "m"])
    assert "required: --out" in capsys.readouterr().err


def test_set_overrides_params_file_with_typed_values(tmp_path, capsys):
    from ray_jobs.sample import parse_args

    params = tmp_path / "p.yaml"
    params.write_text("sample:\n  num_images: 40\n  sampler: ddim\n")
    cfg = parse_args(["--model", "m", "--out", "o", "--params", str(params), "--set", "num_images=64", "guidance_scale=1"])
    assert (cfg.num_images, cfg.sampler, cfg.guidance_scale) == (64, "ddim", 1.0)
    cfg = parse_args(["--model", "m", "--out", "o", "--params", str(params), "--set", "num_images=64", "--num-images", "8"])
    assert cfg.num_images == 8   # a field flag is the most specific
    with pytest.raises(SystemExit) as refused:   # exit status 2, the one line on stderr
        parse_args(["--model", "m", "--out", "o", "--set", "steps=3"])
    assert refused.value.code == 2
    assert "--set steps=3: expected KEY=VALUE with KEY one of" in capsys.readouterr().err


def test_a_stage_sent_as_a_job_gets_its_set_overrides_back():
    from pipelines.common import _argv

    args = argparse.Namespace(out="data/x", set=["lr=1e-3", "name=a b"], plots=None, params="params.yaml")
    assert _argv(args) == "--out data/x --params params.yaml --set lr=1e-3 'name=a b'"
    assert "--set" not in _argv(argparse.Namespace(out="o", set=[]))
