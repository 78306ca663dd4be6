"""mkdocs hook: the CLI reference (docs/cli.md) is the command's own --help, generated at build time from the
parser the command uses (sparsify_cli), so it never disagrees with the command."""
import contextlib
import io
import sys
from pathlib import Path

MARKER = "<!-- cli-help -->"


def _help(argv: list[str]) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    import sparsify_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        sparsify_cli._parser().parse_args([*argv, "--help"])
    return out.getvalue()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    sections = []
    for command in ([], ["convert"], ["inspect"], ["verify"], ["add-modality"]):
        title = " ".join(["sparsify", *command])
        sections.append(f"### `{title}`\n\n```text\n{_help(command).rstrip()}\n```\n")
    return markdown.replace(MARKER, "\n".join(sections))
