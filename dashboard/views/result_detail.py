"""Result detail page: every field of one stored Result, its raw samples plotted, its conditions."""

import json

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.queries import measurements, result_choices, result_detail
from farm.contract import kind_of_test, tokens_per_run

st.title("Result detail")
keys = measurements()
picker = result_choices()
if picker.empty:
    st.info("No results yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`).")
    st.stop()

job_id = st.query_params.get("job")
left, right = st.columns(2)
models = sorted(keys["model"].unique()) if not keys.empty else []
model = left.selectbox("Model", ["(any)"] + models)
tests = sorted(keys.loc[keys["model"] == model, "test"].unique()) if model != "(any)" else []
test = right.selectbox("Test", ["(any)"] + tests)
picker = result_choices(None if model == "(any)" else model, None if test == "(any)" else test)
labels = {r.job_id: f"{r.model} {r.quant} {r.technique} {r.test} on {r.worker} · {r.status} · {r.job_id[:8]}"
          for r in picker.itertuples()}
ids = list(labels)
if job_id and job_id not in labels:
    ids.insert(0, job_id)
    labels[job_id] = job_id
if not ids:
    st.info("No result matches: choose another model or test.")
    st.stop()
chosen = st.selectbox("Result (newest first)", ids, format_func=labels.get)
data = result_detail(chosen)
if data is None:
    st.error(f"No result with job id {chosen!r}: pick one from the list.")
    st.stop()
if isinstance(data, str):
    data = json.loads(data)

stats = data.get("stats") or {}
spec = data.get("speculation") or {}
cols = st.columns(5)
cols[0].metric("status", data.get("status", "?"))
cols[1].metric("tok/s (mean)", f'{data.get("avg_ts", 0):.2f}')
cols[2].metric("± stddev", f'{data.get("stddev_ts", 0):.2f}')
cols[3].metric("repetitions", data.get("repetitions", 0))
cols[4].metric("median tok/s", f'{stats["median_ts"]:.2f}' if stats.get("median_ts") else "—")
if data.get("error"):
    st.error(data["error"])
if stats.get("noisy"):
    st.warning(f'Noisy measurement: coefficient of variation {stats.get("cv", 0):.1%}.')
if stats.get("ci95_high_ts"):
    st.caption(f'95 % confidence interval of the mean: {stats["ci95_low_ts"]:.2f} – {stats["ci95_high_ts"]:.2f} tok/s')
if spec:
    first = [m for m in spec.get("first_mismatch") or [] if m is not None]
    cols = st.columns(4)
    cols[0].metric("speedup ×", f'{spec.get("speedup", 0):.2f}')
    cols[1].metric("acceptance rate", f'{spec.get("acceptance_rate", 0):.1%}')
    cols[2].metric("accepted tokens per pass", f'{spec.get("mean_accepted_per_pass", 0):.2f}')
    cols[3].metric("lossless", "yes" if spec.get("lossless") else f"no: first divergence at token {min(first)}"
                   if first else "no")

st.subheader("Raw samples")
samples = data.get("samples_ns") or []
test_name = data.get("test", "")
# The contract's count: a run over a prompt category times n_gen tokens of each of its prompts.
n_tokens = tokens_per_run(kind_of_test(test_name), data.get("n_prompt", 0), data.get("n_gen", 0)) if test_name else 0
if data.get("prompt_category") and not test_name.startswith("pp"):
    n_tokens = data.get("n_gen", 0) * data.get("n_prompts", 0)
if samples and n_tokens:
    raw = pd.DataFrame({"repetition": range(1, len(samples) + 1), "ms": [ns / 1e6 for ns in samples],
                        "tok/s": [n_tokens * 1e9 / ns for ns in samples]})
    bars = alt.Chart(raw).mark_bar().encode(x="repetition:O", y="tok/s:Q", tooltip=["repetition", "ms", "tok/s"])
    mean = alt.Chart(pd.DataFrame({"tok/s": [data.get("avg_ts", 0)]})).mark_rule(color="red").encode(y="tok/s:Q")
    st.altair_chart(alt.layer(bars, mean).properties(height=260), width="stretch")
    st.caption(f"{test_name}: each bar one timed repetition of {n_tokens} tokens; red: the mean.")
else:
    st.info("This result has no samples (a failed job stores none).")
if spec.get("acceptance_by_position"):
    st.subheader("Acceptance by draft position")
    pos = pd.DataFrame({"position": range(1, len(spec["acceptance_by_position"]) + 1),
                        "acceptance": spec["acceptance_by_position"]})
    st.altair_chart(alt.Chart(pos).mark_bar().encode(x="position:O", y="acceptance:Q").properties(height=200),
                    width="stretch")

st.subheader("Conditions")
a, b, c, d = st.columns(4)
a.caption("hardware")
a.json(data.get("hardware", {}))
b.caption("engine config")
b.json(data.get("config", {}))
c.caption("run conditions (peak memory, energy)")
c.json(data.get("conditions", {}))
d.caption("versions")
d.json(data.get("versions", {}))

st.subheader("Every field")
flat = pd.json_normalize(data, sep=".").T.reset_index()
flat.columns = ["field", "value"]
flat["value"] = flat["value"].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else str(v))
st.dataframe(flat, hide_index=True, width="stretch", height=500)
