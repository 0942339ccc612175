"""The user docs stay true: every command and snippet in README.md and docs/*.md runs, and no doc
speaks of how the work was organised or cites commits outside the performance tables.

Fenced blocks: ```bash / ```sh are shell commands, ```python snippets; ```text shows output and is
not run. An HTML comment on the line before a block says how to treat it:

  <!-- file: PATH -->      a ```python block is the file PATH, written for later blocks to use;
  <!-- exits: N -->        the command must end with status N and the one `error:` line that the
                           ```text block after it shows (`...` matches anything);
  <!-- not run: REASON --> (a GPU, a cluster, PyTorch, a server): each command is checked
                           without running it: its flags parse, its script defines its flags, its
                           extra exists, or CI runs it (.ci/run).

The blocks run in one shared directory (links to experiments/ and launch.py; HOME a temporary
directory, datasets in the session's TFDS dir), README.md first, then docs/ in name order, as a
reader following the docs in one checkout would: a block may use what an earlier block made.
Each case runs the blocks before it that have not run yet, so one case also runs alone; a block
identical to one that already ran is not run twice. A command that trains gets the TINY overrides
appended, nothing else.
"""

import ast
import glob
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest
from conftest import ROOT

# The one mapping from a documented training command to the seconds-long one the test runs:
# appended to every `python launch.py --config=...` that trains (no --mode, or --mode=train),
# each key only where the command does not set it itself; `config.sweep.*` only for configs with
# a sweep. The command is otherwise run as written.
TINY = {"--config.num_epochs": "1", "--config.dataset.name": "digits",
        "--config.sweep.seeds": "(0,)", "--progress": "false"}

USER_DOCS = ["README.md", "CHANGELOG.md", *sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
RUN_DOCS = [d for d in USER_DOCS if d != "CHANGELOG.md"]
HASH_ALLOWED = {"docs/performance.md"}
PROCESS_WORDS = [
    r"\bstop\s+\d", r"\bstop's\b", r"\bstops?\s+(earlier|ago|old|before|later)\b",
    r"\bthis\s+stop\b", r"\b(last|earlier|previous|next|two|three|four|five|several)\s+stops?\b",
    r"\bsessions?\b", r"\bhelpers?\b", r"\bissues?\b", r"\bmain job\b", r"\blecture", r"convgrad",
    r"\bon branch\b"]
COMMIT_HASH = r"(?<![0-9A-Za-z])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![0-9A-Za-z])"
MARKER = re.compile(r"<!--\s*(file|exits|not run)\s*:\s*(.*?)\s*-->")


class Block(NamedTuple):
  doc: str
  line: int        # The opening fence's line, 1-based.
  lang: str
  text: str
  marker: tuple[str, str] | None
  shown: str       # The ```text block that follows, if any (an `exits` block's expected line).

  @property
  def id(self) -> str:
    return f"{self.doc}:{self.line}"


def read_blocks(doc: str) -> list[Block]:
  lines = open(os.path.join(ROOT, doc)).read().splitlines()
  raw, i = [], 0
  while i < len(lines):
    if lines[i].startswith("```"):
      lang, start = lines[i][3:].strip(), i
      i += 1
      while not lines[i].startswith("```"):
        i += 1
      before = next((l for l in reversed(lines[:start]) if l.strip()), "")
      m = MARKER.fullmatch(before.strip())
      raw.append([doc, start + 1, lang, "\n".join(lines[start + 1:i]) + "\n",
                  (m.group(1), m.group(2)) if m else None, ""])
    i += 1
  for a, b in zip(raw, raw[1:]):
    if b[2] == "text":
      a[5] = b[3]
  return [Block(*r) for r in raw]


ALL_BLOCKS = [b for d in RUN_DOCS for b in read_blocks(d)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in ("bash", "sh", "python")]


# -- what every user doc must not say -------------------------------------------------------------

def test_no_process_words_or_commit_hashes_in_user_docs():
  found = []
  for doc in USER_DOCS:
    for n, line in enumerate(open(os.path.join(ROOT, doc)), 1):
      for pattern in PROCESS_WORDS:
        found += [f"{doc}:{n}: {m.group(0)!r}" for m in re.finditer(pattern, line, re.I)]
      if doc not in HASH_ALLOWED:
        found += [f"{doc}:{n}: hash {m.group(0)}" for m in re.finditer(COMMIT_HASH, line)]
  assert not found, "\n".join(found)


def test_readme_is_a_front_page_with_the_ci_command():
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert len(readme.splitlines()) <= 250
  command = "pip install -e '.[test]' && python -m pytest"
  assert command in readme and command in open(os.path.join(ROOT, ".ci", "run")).read()


def _slug(heading: str) -> str:
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_and_paths_named_in_the_docs_exist():
  missing = []
  for doc in USER_DOCS:
    text = open(os.path.join(ROOT, doc)).read()
    for target in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
      path, anchor = target
      if path.startswith("http"):
        continue
      file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
      if not os.path.exists(os.path.join(ROOT, file)):
        missing.append(f"{doc}: link to {file}")
      elif anchor and anchor not in {_slug(h) for h in re.findall(
          r"^#+ (.*)$", open(os.path.join(ROOT, file)).read(), re.M)}:
        missing.append(f"{doc}: link to {file}#{anchor}")
    for path in re.findall(r"`((?:cnnlab|experiments|benchmarks|scripts|tests|docs)/[\w./-]+)`",
                           text):
      if "<" not in path and not glob.glob(os.path.join(ROOT, path.rstrip("/"))):
        missing.append(f"{doc}: {path}")
  assert not missing, "\n".join(missing)


def test_every_block_is_runnable_or_output_and_the_waiting_set_is_current():
  unlabeled = [b.id for b in ALL_BLOCKS if not b.lang]
  assert not unlabeled, f"fenced blocks without a language (bash, python or text): {unlabeled}"
  for b in RUNNABLE:
    if b.marker and b.marker[0] == "file":
      later = [c.text for c in RUNNABLE if c.doc == b.doc and c.line > b.line]
      assert any(b.marker[1] in t for t in later), f"{b.id}: no later block uses {b.marker[1]}"


# -- running the blocks ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared(tmp_path_factory, data_dir):
  """The directory every block runs in, its environment, and which blocks have run."""
  where = tmp_path_factory.mktemp("docs")
  for name in ("experiments", "launch.py"):
    os.symlink(os.path.join(ROOT, name), where / name)
  home = tmp_path_factory.mktemp("home")
  env = dict(os.environ, HOME=str(home), TFDS_DATA_DIR=data_dir, PYTHONUNBUFFERED="1",
             MPLBACKEND="Agg", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}"
             f"{os.environ.get('PATH', '')}", CNNLAB_XLA_CACHE=os.environ.get(
                 "CNNLAB_XLA_CACHE", os.path.expanduser("~/.cache/cnnlab/xla")))
  return {"dir": str(where), "env": env, "outcome": {}}


def _run(shared, args, timeout=600, **kw):
  return subprocess.run(args, cwd=shared["dir"], env=shared["env"], capture_output=True,
                        text=True, timeout=timeout, **kw)


def _logical_lines(text: str) -> list[str]:
  return [l.strip() for l in re.sub(r"\\\n\s*", " ", text).splitlines()
          if l.strip() and not l.strip().startswith("#")]


def _config_facts(shared, spec: str) -> tuple[bool, str]:
  """(whether the config has a sweep, its dataset.name)."""
  path, _, variant = spec.partition(":")
  code = ("import importlib.util, sys; "
          "s = importlib.util.spec_from_file_location('c', sys.argv[1]);"
          " m = importlib.util.module_from_spec(s); s.loader.exec_module(m);"
          " c = m.get_config(*sys.argv[2:]); print('sweep' in c, c.dataset.name)")
  done = _run(shared, [sys.executable, "-c", code, path, *([variant] if variant else [])])
  sweep, name = (done.stdout.strip().splitlines() or ["False ?"])[-1].split()
  return sweep == "True", name


def _tiny(shared, tokens: list[str]) -> list[str]:
  """`tokens` of a launch.py command with TINY appended where it trains (a config that reads a
  folder keeps it: the docs make the folder it names)."""
  flags = dict(t.split("=", 1) for t in tokens if t.startswith("--") and "=" in t)
  if "--config" not in flags or flags.get("--mode", "train") != "train":
    return tokens
  sweep, dataset = _config_facts(shared, flags["--config"])
  keep = {"--config.dataset.name"} if dataset == "folder" else set()
  return tokens + [f"{k}={v}" for k, v in TINY.items() if k not in flags and k not in keep
                   and (sweep or not k.startswith("--config.sweep."))]


def shell_script(shared, text: str, tiny: bool = True) -> str:
  """The block as a bash script that fails on the first failing command (background ones too),
  each `launch.py` line with TINY appended where it trains."""
  out = ["set -euo pipefail", "pids=()"]
  for line in _logical_lines(text):
    if line == "wait":  # Waits below, for each process, so that a failing one fails the block.
      continue
    background = line.endswith("&") and not line.endswith("&&")
    line = line[:-1].rstrip() if background else line
    tokens = shlex.split(line)
    assert "#" not in tokens, f"a comment at the end of a command: {line}"
    if tiny and "launch.py" in tokens:
      assert not {"&&", "||", "|", ";"} & set(tokens), f"launch.py in a compound command: {line}"
      line = " ".join([line, *map(shlex.quote, _tiny(shared, tokens)[len(tokens):])])
    out.append(f"{line} & pids+=($!)" if background else line)
  out.append('for p in "${pids[@]}"; do wait "$p"; done')
  return "\n".join(out) + "\n"


def _glob_line(shown: str) -> re.Pattern:
  line = shown.strip().splitlines()[0]
  return re.compile(".*".join(re.escape(part) for part in line.split("...")))


def _run_block(shared, b: Block) -> str | None:
  """Runs (or, for `not run`, checks) one block; returns None when it did what the doc says,
  else what went wrong."""
  kind = b.marker[0] if b.marker else None
  if kind == "file":
    target = os.path.join(shared["dir"], b.marker[1])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
      f.write(b.text)
    return None
  if kind == "not run":
    return _check_unrun(shared, b)
  if b.lang == "python":
    done = _run(shared, [sys.executable, "-"], input=b.text)
  else:
    done = _run(shared, ["bash", "-c", shell_script(shared, b.text, tiny=kind != "exits")])
  said = f"\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
  if kind == "exits":
    errors = [l for l in done.stderr.splitlines() if l.startswith("error: ")]
    if done.returncode != int(b.marker[1]) or len(errors) != 1 or "Traceback" in done.stderr:
      return f"expected exit {b.marker[1]} and one error line, got {done.returncode}{said}"
    if not _glob_line(b.shown).fullmatch(errors[0]):
      return f"the doc shows\n{b.shown.strip()}\nbut the command said\n{errors[0]}"
    return None
  return None if done.returncode == 0 else f"exit status {done.returncode}{said}"


def _run_once(shared, b: Block) -> str | None:
  """A block that repeats one that already ran without a problem (a guide repeating the README's
  command in the same directory) is not run again."""
  if any(shared["outcome"].get(a.id, "") is None and a.text == b.text and a.marker == b.marker
         for a in RUNNABLE):
    return None
  return _run_block(shared, b)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_documented_block_runs(shared, block):
  for earlier in RUNNABLE[:RUNNABLE.index(block) + 1]:
    if earlier.id not in shared["outcome"]:
      shared["outcome"][earlier.id] = _run_once(shared, earlier)
  problem = shared["outcome"][block.id]
  assert problem is None, f"{block.id}:\n{block.text}\n{problem}"


# -- checks of commands that cannot run here ------------------------------------------------------

_LAUNCH_PARSE = ("import sys; sys.path.insert(0, '.'); import launch; from absl import flags; "
                 "flags.FLAGS(sys.argv); c = flags.FLAGS.config; c.keys(); print('parsed')")


def _defined_flags(script: str) -> set[str]:
  text = open(os.path.join(ROOT, script)).read()
  return set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text)) | set(
      re.findall(r"add_argument\(\s*\"--(\w+)\"", text))


def _check_command(shared, line: str) -> str | None:
  if line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines():
    return None  # CI runs it.
  tokens = shlex.split(line, comments=True)
  while tokens and (re.fullmatch(r"\w+=.*", tokens[0]) or tokens[0] in ("srun", "-n")
                    or tokens[0].isdigit()):
    tokens = tokens[1:]
  program = tokens[0]
  if program == "python" and tokens[1] == "launch.py":
    done = _run(shared, [sys.executable, "-c", _LAUNCH_PARSE, *tokens[2:]])
    return None if done.stdout.strip().endswith("parsed") else f"{line}: {done.stderr[-2000:]}"
  if program == "python" and tokens[1].startswith(("benchmarks/", "scripts/")):
    flags = {t[2:].split("=")[0] for t in tokens[2:] if t.startswith("--")}
    unknown = flags - _defined_flags(tokens[1])
    return f"{line}: {tokens[1]} defines no {sorted(unknown)}" if unknown else None
  if program == "pip" and tokens[1:3] == ["install", "-e"]:
    extra = re.fullmatch(r"\.\[(\w+)\]", tokens[3]).group(1)
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    return None if re.search(rf"^{extra} = \[", pyproject, re.M) else f"{line}: no extra {extra}"
  if program == "tensorboard" and tokens[1] == "--logdir":
    logdir = os.path.join(shared["dir"], tokens[2])
    events = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    return None if shutil.which("tensorboard", path=shared["env"]["PATH"]) and events else (
        f"{line}: no tensorboard, or no event files in {logdir}")
  return f"{line}: the test has no check for this command; run it, or add a check"


def _check_snippet(b: Block) -> str | None:
  """A snippet that cannot run: it compiles, and the names it imports or takes from a module
  exist."""
  tree = ast.parse(b.text)
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        modules[alias.asname or alias.name] = importlib.import_module(alias.name)
    elif isinstance(node, ast.ImportFrom):
      for alias in node.names:
        try:
          value = importlib.import_module(f"{node.module}.{alias.name}")
        except ImportError:
          value = getattr(importlib.import_module(node.module), alias.name)
        modules[alias.asname or alias.name] = value
  missing = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id in modules
             and type(modules[n.value.id]).__name__ == "module"
             and not hasattr(modules[n.value.id], n.attr)]
  return f"names that do not exist: {missing}" if missing else None


def _check_unrun(shared, b: Block) -> str | None:
  if b.lang == "python":
    try:
      return _check_snippet(b)
    except (ImportError, AttributeError, SyntaxError) as e:
      return f"{type(e).__name__}: {e}"
  problems = [p for p in (_check_command(shared, l) for l in _logical_lines(b.text)) if p]
  return "\n".join(problems) or None
