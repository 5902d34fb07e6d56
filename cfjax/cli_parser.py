"""The `cfjax` command's arguments: every subcommand and flag, each number parsed by a checking
type of `cfjax.arguments`, so a bad value is refused in one line before any work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cfjax
from cfjax import arguments as arg
from cfjax.experiments.commands import add_experiment_parsers
from cfjax.present import printable
from cfjax.weights.loader import DEFAULT_MODEL


def _sampler_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    off = "off" if defaults else "the trace's"  # without defaults: the trace's sampler is kept
    p.add_argument("--temperature", type=arg.temperature, default=d(1.0),
                   help="0 = greedy" + ("" if defaults else " (default: the trace's)"))  # fmt: skip
    p.add_argument("--top-p", type=arg.probability, help=f"nucleus mass kept (default: {off})")
    p.add_argument("--top-k", type=arg.positive, help=f"most likely tokens kept (default: {off})")
    p.add_argument(
        "--mechanism",
        default=d("gumbel"),
        choices=["gumbel", "inverse-cdf", "gumbel-rank"],
        help="how the noise picks a token (DESIGN §2)"
        + ("" if defaults else " (default: the trace's)"),
    )


def _edit_args(p: argparse.ArgumentParser, prompt_flag: str) -> None:
    """The intervention flags of `counterfactual` and `abduct`."""
    p.add_argument("--replace", type=arg.replacement, metavar="OLD=>NEW",
                   help="replace text in the response")  # fmt: skip
    p.add_argument("--occurrence", type=arg.positive, default=1, help="which OLD, from 1")
    p.add_argument("--at", type=arg.natural, metavar="POS", help="response token position to replace")  # fmt: skip
    p.add_argument("--token", metavar="TEXT",
                   help="with --at: the text whose tokens replace the one token at POS")  # fmt: skip
    p.add_argument(prompt_flag, dest="prompt", default=None, help="a new user prompt")
    p.add_argument("--system", default=None, help="a new system message")
    p.add_argument("--auto-at", type=arg.natural, metavar="POS", help="automatic intervention at POS")  # fmt: skip


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """A flag's default appended to its help, unless the help says it or there is none (None,
    or False for a switch): no "(default: None)" and no default said twice."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument ending as every other error: one line, exit status 1, and
    every flag's default shown in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"cfjax: error: {printable(message)} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(1)


def parser(description: str) -> argparse.ArgumentParser:
    """The `cfjax` command's parser: every subcommand, its flags and their checking types."""
    root = _Parser(prog="cfjax", description=description)
    root.add_argument("--version", action="version", version=f"cfjax {cfjax.__version__}")
    sub = root.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="sample a response and save its trace")
    g.add_argument("--model", default=DEFAULT_MODEL, help="name, model dir or .gguf")
    g.add_argument("--prompt", required=True, type=arg.text, help="the user message")
    g.add_argument("--system", default=None, help="a system message (chat template only)")
    g.add_argument("--no-chat", action="store_true", help="raw text prompt, no chat template")
    g.add_argument("--seed", type=arg.seed, default=0, help="the noise key, in [0, 2**32)")
    g.add_argument("--max-new-tokens", type=arg.positive, default=128, help="response budget")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="params dtype (default: stored)",
    )
    g.add_argument("--out", type=Path, default=None, help="write the trace JSON here")
    _sampler_args(g, defaults=True)

    cv = sub.add_parser("converse", help="answer a script of user messages, turn by turn")
    cv.add_argument("--model", default=DEFAULT_MODEL, help="name, model dir or .gguf")
    cv.add_argument("--user", required=True, action="append", type=arg.text,
                    help="a user message (repeat: one per turn, in order)")  # fmt: skip
    cv.add_argument("--system", default=None, help="a system message")
    cv.add_argument("--seed", type=arg.seed, default=0, help="the conversation's key, in [0, 2**32)")  # fmt: skip
    cv.add_argument("--max-new-tokens", type=arg.positive, default=128, help="budget of each turn")  # fmt: skip
    cv.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="params dtype (default: stored)")  # fmt: skip
    cv.add_argument("--out", type=Path, default=None, help="write the conversation JSON here")
    _sampler_args(cv, defaults=True)

    c = sub.add_parser("counterfactual", help="what would the model have written if ...")
    c.add_argument("trace", type=Path, help="trace JSON of `cfjax generate --out` (or `converse --out`)")  # fmt: skip
    c.add_argument("--turn", type=arg.natural, default=None,
                   help="a conversation's turn the intervention changes (0 = the first answer)")  # fmt: skip
    c.add_argument(
        "--model", default=None, help="another location of the trace's model (default: its id)"
    )
    c.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: the trace's"
    )
    _edit_args(c, prompt_flag="--prompt")
    c.add_argument(
        "--resume-at", type=arg.natural, default=None, help="factual step to align noise to"
    )
    c.add_argument("--interventional", action="store_true", help="fresh noise instead")
    c.add_argument("--seed", type=arg.seed, default=1, help="noise seed for --interventional")
    c.add_argument("--out", type=Path, default=None, help="write the result trace JSON here")
    c.add_argument("--html", type=Path, default=None, help="write a side-by-side HTML diff")
    _sampler_args(c, defaults=False)

    a = sub.add_parser(
        "abduct", help="counterfactuals of observed text: what would the model have written instead"
    )
    a.add_argument("--model", default=DEFAULT_MODEL, help="name, model dir or .gguf")
    a.add_argument(
        "--prompt", required=True, type=arg.text, dest="observed_prompt", help="the prompt answered"
    )
    a.add_argument("--observed-system", default=None, help="the system message it had")
    a.add_argument("--no-chat", action="store_true", help="raw text prompt, no chat template")
    response = a.add_mutually_exclusive_group(required=True)
    response.add_argument("--response", help="the observed response text")
    response.add_argument("--response-file", type=Path, help="a file holding the response")
    a.add_argument("--samples", type=arg.positive, default=16, help="posterior samples")
    a.add_argument("--seed", type=arg.seed, default=0, help="posterior noise key, in [0, 2**32)")
    a.add_argument("--full-support", action="store_true",
                   help="model the observed steps with temperature alone (no truncation)")  # fmt: skip
    a.add_argument(
        "--max-new-tokens", type=arg.positive, default=None, help="default: observed length"
    )
    a.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="params dtype (default: stored)",
    )
    _edit_args(a, prompt_flag="--prompt-edit")  # --prompt names the observed text's prompt
    a.add_argument("--contains", default=None, help="report the share of texts containing this")
    a.add_argument("--out", type=Path, default=None, help="write every trace as JSON here")
    _sampler_args(a, defaults=True)
    for name, kind in (
        ("temperature", arg.temperature),
        ("top-k", arg.positive),
        ("top-p", arg.probability),
    ):
        a.add_argument(f"--new-{name}", type=kind, default=None, help=f"intervention: {name}")

    at = sub.add_parser("attribute", help="the effect of each word of the prompt on the answer")
    at.add_argument("trace", type=Path, help="trace JSON written by `cfjax generate --out`")
    at.add_argument("--model", default=None, help="another location of the trace's model (default: its id)")  # fmt: skip
    at.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the trace's")  # fmt: skip
    at.add_argument("--over", default="prompt", choices=["prompt", "response"], help="whose units")  # fmt: skip
    at.add_argument("--unit", default=None, choices=["word", "token"],
                    help="default: word over the prompt, token over the response")  # fmt: skip
    at.add_argument("--replace", default=None, metavar="TEXT", help="put TEXT in each unit's place (default: remove it)")  # fmt: skip
    at.add_argument("--auto", action="store_true", help="another token from the model's top-p set instead")  # fmt: skip
    at.add_argument("--contains", default=None, help="report whether each answer still contains this")  # fmt: skip
    at.add_argument("--no-interventional", action="store_true", help="skip the fresh-noise runs")
    at.add_argument("--seed", type=arg.seed, default=1, help="fresh noise (and --auto's draws)")
    at.add_argument("--batch-size", type=arg.positive, default=64, help="rows per engine batch")
    at.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    at.add_argument("--plot", type=Path, default=None, help="write a heatmap (.png, .svg, .pdf)")

    add_experiment_parsers(sub, _Parser)

    v = sub.add_parser("convert", help="convert a checkpoint to orbax + cfjax.json")
    v.add_argument("src", help="HF folder, Meta folder, .gguf or model name")
    v.add_argument("dst", type=Path, help="the folder to write")
    v.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="stored dtype (default: the source's)",
    )
    v.add_argument("--force", action="store_true", help="overwrite an existing DST")

    sv = sub.add_parser("serve", help="the counterfactual explorer in the browser")
    sv.add_argument("--model", default=DEFAULT_MODEL, help="name, model dir or .gguf")
    sv.add_argument("--host", default="127.0.0.1", help="loopback by default")
    sv.add_argument("--port", type=arg.port, default=8000, help="TCP port")
    sv.add_argument(
        "--max-new-tokens", type=arg.positive, default=512, help="the most a request may ask"
    )
    sv.add_argument(
        "--max-prompt-tokens",
        type=arg.positive,
        default=1024,
        help="the longest prompt, system message or edit text a request may send",
    )
    sv.add_argument(
        "--max-samples",
        type=arg.positive,
        default=64,
        help="the most posterior or interventional samples a request may ask",
    )
    sv.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated Host names served besides 127.0.0.1, localhost and "
        "--host (DNS-rebinding protection); '*' allows any",
    )
    sub.add_parser("models", help="list known model names and converted copies")
    d = sub.add_parser("demo", help="rename the captain in a story, on the embedded model")
    d.add_argument("--seed", type=arg.seed, default=None, help="the story's seed (default: 0)")
    d.add_argument("--html", type=Path, default=None, help="also write a side-by-side HTML diff")
    return root
