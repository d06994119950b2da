//! The live results page: counts, percentages and a bar per option, updated from the event
//! stream without a reload. Self-contained: no external scripts, styles or fonts.

pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tally: live results</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
.row { display: grid; grid-template-columns: 6rem 1fr 9rem; gap: .75rem; align-items: center; margin: .5rem 0; }
.bar { height: 1.6rem; background: #e4e7ef; border-radius: .3rem; overflow: hidden; }
.fill { height: 100%; background: #335; width: 0; transition: width .3s; }
.meta { color: #667; font-size: .9rem; }
</style></head>
<body>
<h1>Results: <span id="poll"></span></h1>
<div id="rows"></div>
<p class="meta"><span id="total">0</span> votes &middot; region <span id="region">?</span> &middot;
replica lag <span id="lag">?</span> ms &middot; as of <span id="as-of">?</span> <span id="fallback"></span></p>
<script>
const poll = new URLSearchParams(location.search).get("poll") || "default";
document.getElementById("poll").textContent = poll;
function render(r) {
  const rows = document.getElementById("rows");
  rows.replaceChildren();
  for (const [option, count] of Object.entries(r.counts)) {
    const pct = r.total ? (100 * count / r.total) : 0;
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.option = option;
    const name = document.createElement("b"); name.textContent = option;
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = pct.toFixed(1) + "%";
    bar.appendChild(fill);
    const num = document.createElement("span"); num.className = "count";
    num.textContent = count + " (" + pct.toFixed(1) + "%)";
    row.append(name, bar, num);
    rows.appendChild(row);
  }
  document.getElementById("total").textContent = r.total;
  document.getElementById("region").textContent = r.region;
  document.getElementById("lag").textContent = r.replica_lag_ms === null ? "unknown" : Math.round(r.replica_lag_ms);
  document.getElementById("as-of").textContent = r.as_of || "unknown";
  document.getElementById("fallback").textContent = r.fallback ? "(served by " + r.source + ", a fallback)" : "";
}
const events = new EventSource("/v1/polls/" + encodeURIComponent(poll) + "/results/stream");
events.addEventListener("results", e => render(JSON.parse(e.data)));
</script>
</body></html>
"#;
