"use strict";
// Sample browser. Data comes from the JSON block; every piece of it reaches the page through
// textContent (never innerHTML), and only one page of cases is in the DOM at a time.
(function () {
  var PAGE = 25;
  var D = JSON.parse(document.getElementById("samples-data").textContent);
  var root = document.getElementById("browser");
  // cases are compared against the reference, or against the promoted baseline when the run has one
  var state = { ref: D.reference, task: "", variant: "", metric: "", mode: "all", q: "", page: 0 };
  var ref = state.ref, others = [];
  function against(v) {
    state.ref = ref = v;
    others = D.variants.filter(function (x) { return x !== ref; });
    if (others.indexOf(state.variant) < 0) state.variant = "";
  }
  against(D.reference);
  var haystacks = null;  // lowercased text per case, built on the first search

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function select(label, options, value, onChange) {
    var l = el("label", null, label), s = el("select");
    options.forEach(function (o) {
      var opt = el("option", null, o[1]);
      opt.value = o[0];
      s.appendChild(opt);
    });
    s.value = value;
    s.addEventListener("change", function () { onChange(s.value); });
    l.appendChild(s);
    return l;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "invalid";
    return Math.abs(v - Math.round(v)) < 1e-9 ? String(Math.round(v)) : v.toFixed(3);
  }
  function score(c, variant, metric) {
    var o = c.o[variant];
    var s = o && o.s[metric];
    return s && typeof s[0] === "number" ? s[0] : null;
  }
  function metricsOf(c) { return D.tasks[c.t].metrics; }
  // the signed gain of b over a: metrics where less is better (KL) count the other way
  function gain(c, m, a, b) { return (D.tasks[c.t].lower || []).indexOf(m) >= 0 ? a - b : b - a; }
  // +1: some compared variant beats the reference on some chosen metric; -1: loses; both: 2
  function change(c) {
    var worse = false, better = false;
    var vs = state.variant ? [state.variant] : others;
    var ms = state.metric ? [state.metric] : metricsOf(c);
    vs.forEach(function (v) {
      ms.forEach(function (m) {
        var a = score(c, ref, m), b = score(c, v, m);
        if (a === null || b === null) return;
        if (gain(c, m, a, b) < 0) worse = true;
        if (gain(c, m, a, b) > 0) better = true;
      });
    });
    return { worse: worse, better: better };
  }
  function haystack(i) {
    if (!haystacks) {
      haystacks = D.cases.map(function (c) {
        var parts = [c.id, c.p, c.y, c.m];
        Object.keys(c.o).forEach(function (v) {
          var o = c.o[v];
          parts.push(o.o);
          Object.keys(o.s).forEach(function (m) { parts.push(o.s[m][1]); });
        });
        return parts.join("\n").toLowerCase();
      });
    }
    return haystacks[i];
  }
  function filtered() {
    var q = state.q.toLowerCase(), out = [], nWorse = 0, nBetter = 0;
    var task = state.task === "" ? -1 : Number(state.task);
    D.cases.forEach(function (c, i) {
      if (task >= 0 && c.t !== task) return;
      if (q && haystack(i).indexOf(q) < 0) return;
      var ch = change(c);
      if (ch.worse) nWorse++;
      if (ch.better) nBetter++;
      if (state.mode === "regressions" && !ch.worse) return;
      if (state.mode === "improvements" && !ch.better) return;
      if (state.mode === "changed" && !ch.worse && !ch.better) return;
      out.push({ c: c, ch: ch });
    });
    return { rows: out, worse: nWorse, better: nBetter };
  }

  var controls = el("div", "controls"), pagerTop = el("div", "pager"), list = el("div"), pagerBottom = el("div", "pager");
  var count = el("span", "count");

  function metricOptions() {
    var names = [];
    D.tasks.forEach(function (t, i) {
      if (state.task !== "" && Number(state.task) !== i) return;
      t.metrics.forEach(function (m) { if (names.indexOf(m) < 0) names.push(m); });
    });
    return [["", "any metric"]].concat(names.map(function (m) { return [m, m]; }));
  }
  function buildControls() {
    controls.textContent = "";
    controls.appendChild(select("Task", [["", "all tasks"]].concat(D.tasks.map(function (t, i) { return [String(i), t.name]; })),
      state.task, function (v) { state.task = v; state.metric = ""; state.page = 0; buildControls(); render(); }));
    if (D.baseline) {
      controls.appendChild(select("Against", [[D.reference, D.reference + " (reference)"], [D.baseline, D.baseline + " (production)"]],
        state.ref, function (v) { against(v); state.page = 0; buildControls(); render(); }));
    }
    controls.appendChild(select("Compare variant", [["", "any variant"]].concat(others.map(function (v) { return [v, v + " vs " + ref]; })),
      state.variant, function (v) { state.variant = v; state.page = 0; render(); }));
    controls.appendChild(select("Metric", metricOptions(), state.metric,
      function (v) { state.metric = v; state.page = 0; render(); }));
    controls.appendChild(select("Show", [["all", "all cases"], ["regressions", "regressions"], ["improvements", "improvements"], ["changed", "any change"]],
      state.mode, function (v) { state.mode = v; state.page = 0; render(); }));
    var l = el("label", null, "Search"), input = el("input");
    input.type = "search";
    input.placeholder = "id, prompt, output, reason…";
    input.value = state.q;
    var timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.q = input.value; state.page = 0; render(); }, 150);
    });
    l.appendChild(input);
    controls.appendChild(l);
    controls.appendChild(count);
  }
  function pager(box, pages, total) {
    box.textContent = "";
    var prev = el("button", null, "‹ Prev"), next = el("button", null, "Next ›");
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    function go(step) {
      state.page += step;
      render();
      if (box === pagerBottom) root.scrollIntoView();  // the new page starts at the top
    }
    prev.addEventListener("click", function () { go(-1); });
    next.addEventListener("click", function () { go(1); });
    box.appendChild(prev);
    box.appendChild(el("span", null, total ? "page " + (state.page + 1) + " of " + pages : ""));
    box.appendChild(next);
  }
  function pre(text) { return el("pre", null, text); }
  function card(row) {
    var c = row.c, ch = row.ch;
    var box = el("article", "case" + (ch.worse ? " regression" : ch.better ? " improvement" : ""));
    var head = el("header");
    head.appendChild(el("span", "cid", c.id));
    head.appendChild(el("span", "tag", D.tasks[c.t].name));
    if (ch.worse) head.appendChild(el("span", "pill fail", "regression"));
    if (ch.better) head.appendChild(el("span", "pill pass", "improvement"));
    if (c.m) head.appendChild(el("span", "tag", c.m));
    box.appendChild(head);
    var det = el("details"), sum = el("summary", null, "Prompt (" + c.p.length + " chars)");
    det.appendChild(sum);
    det.appendChild(pre(c.p));
    box.appendChild(det);
    if (c.y) {
      box.appendChild(el("div", "tag", "Target"));
      box.appendChild(pre(c.y));
    }
    var variants = D.variants.filter(function (v) { return c.o[v]; });
    var outs = el("div", "outs");
    outs.style.gridTemplateColumns = "repeat(" + variants.length + ", minmax(0, 1fr))";
    var ms = state.metric ? [state.metric] : metricsOf(c);
    variants.forEach(function (v) {
      var o = c.o[v], cls = "out";
      if (v !== ref) {
        ms.forEach(function (m) {
          var a = score(c, ref, m), b = score(c, v, m);
          if (a === null || b === null) return;
          if (gain(c, m, a, b) < 0) cls = "out worse";
          else if (gain(c, m, a, b) > 0 && cls === "out") cls = "out better";
        });
      }
      var d = el("div", cls), h = el("h4");
      var name = el("span", null, v + (v === ref ? " (compared against)" : ""));
      var sw = el("span", "swatch");
      sw.style.background = D.colors[D.variants.indexOf(v)];
      name.insertBefore(sw, name.firstChild);
      h.appendChild(name);
      if (o.c) h.appendChild(el("span", "tag", "cached"));
      d.appendChild(h);
      if (o.p !== undefined) {
        var pd = el("details");
        pd.appendChild(el("summary", null, "prompt differs"));
        pd.appendChild(pre(o.p));
        d.appendChild(pd);
      }
      d.appendChild(pre(o.o));
      var ul = el("ul");
      Object.keys(o.s).forEach(function (m) {
        var li = el("li");
        li.appendChild(el("span", null, m + ": "));
        li.appendChild(el("span", "val", fmt(o.s[m][0])));
        if (o.s[m][1]) li.appendChild(el("span", "why", " — " + o.s[m][1]));
        ul.appendChild(li);
      });
      d.appendChild(ul);
      outs.appendChild(d);
    });
    box.appendChild(outs);
    return box;
  }
  function render() {
    var f = filtered(), total = f.rows.length, pages = Math.max(1, Math.ceil(total / PAGE));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    count.textContent = total + " of " + D.cases.length + " cases · " + f.worse + " with a regression · " + f.better + " with an improvement";
    pager(pagerTop, pages, total);
    pager(pagerBottom, pages, total);
    list.textContent = "";
    if (!total) list.appendChild(el("div", "empty", D.cases.length ? "No case matches these filters." : "No samples were recorded for this run."));
    var frag = document.createDocumentFragment();
    f.rows.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (row) { frag.appendChild(card(row)); });
    list.appendChild(frag);
  }

  root.textContent = "";
  [controls, pagerTop, list, pagerBottom].forEach(function (n) { root.appendChild(n); });
  buildControls();
  render();
})();
