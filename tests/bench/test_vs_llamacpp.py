"""bench/vs_llamacpp.py end to end against stand-ins for llama.cpp's tools (no llama.cpp build
here): the GGUF conversion is asked for with the offline tokenizer.json in place and cached, both
tools are called with the documented arguments, and the JSON reports both engines and the
ratios of the figures the tools printed."""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA_BENCH = """\
#!{python}
import json, sys
a = sys.argv
assert "-fa" in a and a[a.index("-fa") + 1] == "1" and a[a.index("-o") + 1] == "json", a
p, n, d = (int(a[a.index(f) + 1]) for f in ("-p", "-n", "-d"))
assert d == p, a
open({log!r}, "a").write(" ".join(a[1:]) + "\\n")
rec = lambda pp, tg, ts: {{"build_commit": "fake123", "n_prompt": pp, "n_gen": tg,
                           "n_depth": d, "avg_ts": ts, "stddev_ts": 0.0, "samples_ts": [ts]}}
print(json.dumps([rec(p, 0, 1000.0), rec(0, n, 50.0)], indent=1))
"""

BATCHED_BENCH = """\
#!{python}
import json, sys
a = sys.argv
pp, tg = int(a[a.index("-npp") + 1]), int(a[a.index("-ntg") + 1])
open({log!r}, "a").write(" ".join(a[1:]) + "\\n")
print("some log line")
for pl in map(int, a[a.index("-npl") + 1].split(",")):
    assert int(a[a.index("-c") + 1]) >= pl * (pp + tg)
    print(json.dumps({{"pp": pp, "tg": tg, "pl": pl, "speed_pp": 800.0 * pl,
                      "speed_tg": 40.0 * pl}}))
"""

CONVERTER = """\
import os, sys
import gguf  # from the tree's gguf-py, as the real converter
stage, out = sys.argv[1], sys.argv[sys.argv.index("--outfile") + 1]
assert sys.argv[sys.argv.index("--outtype") + 1] == "bf16"
assert os.path.exists(os.path.join(stage, "tokenizer.json"))
assert os.path.exists(os.path.join(stage, "config.json"))
open({log!r}, "a").write("convert\\n")
open(out, "wb").write(b"GGUF" + gguf.MARK)
"""


def make_llama_tree(root, log):
    build = root / "build" / "bin"
    build.mkdir(parents=True)
    for name, body in (("llama-bench", LLAMA_BENCH), ("llama-batched-bench", BATCHED_BENCH)):
        path = build / name
        path.write_text(body.format(python=sys.executable, log=str(log)))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (root / "convert_hf_to_gguf.py").write_text(CONVERTER.format(log=str(log)))
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / "gguf-py" / "gguf" / "__init__.py").write_text("MARK = b'!'\n")


@pytest.mark.slow
def test_vs_llamacpp_with_stand_in_tools(tmp_path):
    log = tmp_path / "calls.log"
    make_llama_tree(tmp_path / "llama.cpp", log)
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the random checkpoint goes there
    cmd = [sys.executable, os.path.join(ROOT, "bench", "vs_llamacpp.py"), "--llama-cpp",
           str(tmp_path / "llama.cpp"), "--preset", "tiny", "--prompt-len", "16",
           "--new-tokens", "3", "--batches", "1,2", "--rounds", "2", "--llama-repetitions", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    ours, llama = result["gptoss_jax"], result["llama.cpp"]
    assert llama["prefill_b1"] == 1000.0 and llama["decode_b1"] == 50.0
    assert llama["prefill_b2"] == 1600.0 and llama["decode_b2"] == 80.0
    assert len(ours["rounds"]) == len(llama["rounds"]) == 2
    for f in ("prefill_b1", "decode_b1", "prefill_b2", "decode_b2"):
        assert ours[f] > 0
        assert result["ratio_ours_over_llama_cpp"][f] == pytest.approx(ours[f] / llama[f])
    assert result["versions"]["llama_cpp_build"] == "fake123"
    assert result["machine"]["copy_bandwidth_gbs"] > 0 and result["machine"]["cores"] >= 1
    assert ours["peak_rss_gib"] > 0 and ours["decode_bytes_per_token"] > 0
    gguf = result["gguf"]
    assert os.path.basename(gguf).startswith("gptoss_bench_tiny.") and open(gguf, "rb").read() == b"GGUF!"
    calls = log.read_text().splitlines()
    assert calls.count("convert") == 1
    assert sum("-npl 1,2" in c for c in calls) == 2 and sum("-fa 1" in c for c in calls) == 2

    # a second run finds the cached GGUF and does not convert again
    again = subprocess.run(cmd[:-6] + ["--rounds", "1", "--batches", "1", "--llama-repetitions",
                                       "1"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log.read_text().splitlines().count("convert") == 1
    assert json.loads(again.stdout)["gguf"] == gguf


def test_missing_tools_are_named(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "vs_llamacpp.py"),
                          "--llama-cpp", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "llama-bench not found" in out.stderr
