/* The dsched dashboard: draws every <section class="view" data-view="..."> of the page.

   Theory of operation: the scheduler serves one snapshot (dashboard/snapshot.json, built
   at most once a second and shared by every viewer) and the task stream as bars after a
   cursor (dashboard/task-stream.json?since=N). This script polls both, one request at a
   time each, and redraws the views from them; it keeps the last MAX_BARS bars itself, so
   the scheduler never replays history. URLs are relative to the page, so the dashboard
   works under --dashboard-prefix and behind proxies. Per-worker views switch to
   histograms past HISTOGRAM_AT workers, and the task stream to one row per worker (then
   per group of workers) past MAX_ROWS rows, so 1,000 workers stay readable.

   Every view writes what it drew into data-* attributes of its section (bars, rows,
   prefixes, workers), which the headless-browser tests read; text from the scheduler
   (keys, tracebacks) only ever goes into textContent. */
(function () {
  "use strict";

  var POLL_MS = 1000;
  var MAX_BARS = 5000;
  var WINDOW_S = 60;        // the task stream shows at most the last minute of bars
  var MAX_ROWS = 120;       // task stream rows before aggregating
  var HISTOGRAM_AT = 100;   // per-worker bars up to this many workers, then histograms
  var TABLE_ROWS = 200;
  var PROGRESS_ROWS = 40;

  var TITLES = {
    "task-stream": "Task Stream",
    "progress": "Progress",
    "workers-memory": "Bytes stored per worker",
    "cluster-memory": "Bytes stored (cluster)",
    "nprocessing": "Tasks processing per worker",
    "occupancy": "Occupancy (tasks processing per thread)",
    "cpu": "Worker CPU",
    "workers-transfer-bytes": "Bytes in transfer per worker",
    "workers": "Workers",
    "exceptions": "Exceptions",
    "scheduler-system": "Scheduler CPU and event-loop lag"
  };

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      for (var name in attrs) {
        if (name === "text") node.textContent = attrs[name];
        else if (name === "style") node.setAttribute("style", attrs[name]);
        else node.setAttribute(name, attrs[name]);
      }
    }
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }
  var SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    for (var name in attrs) {
      if (name === "text") node.textContent = attrs[name];
      else node.setAttribute(name, attrs[name]);
    }
    return node;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    var i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : String(Math.round(n))) + " " + units[i];
  }
  function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(0) + "%"; }
  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(1) + " ms";
    return s.toFixed(2) + " s";
  }
  function hash(text) {
    var h = 2166136261;
    for (var i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 16777619); }
    return h >>> 0;
  }
  function prefixColor(prefix) { return "hsl(" + (hash(prefix) % 360) + ", 62%, 52%)"; }
  var ACTION_COLORS = { transfer: "rgba(214, 39, 40, 0.75)", "disk-read": "#e08a2c",
                        "disk-write": "#e08a2c", error: "#111" };
  function barColor(bar) { return ACTION_COLORS[bar[3]] || prefixColor(bar[2]); }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function byName(a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; }

  // ------------------------------------------------------------------ the views
  var views = [];   // {name, section, body, note}

  function setUp(section) {
    var name = section.getAttribute("data-view");
    if (!TITLES[name]) {
      section.appendChild(el("p", { "class": "empty", text: "No such view: " + name }));
      return;
    }
    var note = el("span", { "class": "note" });
    section.appendChild(el("h2", {}, [el("span", { text: TITLES[name] }), note]));
    var body = el("div", { "class": "body" });
    section.appendChild(body);
    views.push({ name: name, section: section, body: body, note: note });
  }

  function histogram(body, values, label, format) {
    // Counts of workers per bin of ``values`` (20 bins from 0 to the maximum).
    var max = Math.max.apply(null, values.concat([1e-9]));
    var bins = 20, counts = new Array(bins).fill(0);
    values.forEach(function (v) { counts[Math.min(bins - 1, Math.floor((v / max) * bins))]++; });
    var top = Math.max.apply(null, counts), w = 600, h = 140;
    var chart = svg("svg", { viewBox: "0 0 " + w + " " + (h + 18), "class": "histogram",
                             "data-histogram": counts.join(","), preserveAspectRatio: "none" });
    counts.forEach(function (n, i) {
      var bh = top ? (n / top) * h : 0;
      var rect = svg("rect", { "class": "hbar", x: (i * w) / bins + 1, y: h - bh,
                               width: w / bins - 2, height: bh });
      rect.appendChild(svg("title", { text: n + " workers: " + format((i * max) / bins) +
                                      " – " + format(((i + 1) * max) / bins) }));
      chart.appendChild(rect);
    });
    chart.appendChild(svg("text", { x: 0, y: h + 14, text: format(0) }));
    chart.appendChild(svg("text", { x: w, y: h + 14, "text-anchor": "end", text: format(max) }));
    body.appendChild(chart);
    body.appendChild(el("div", { "class": "muted", text: values.length + " workers; " + label }));
  }

  function barRow(label, segments, scale, value, attrs, limitAt) {
    var track = el("div", { "class": "track" });
    var left = 0;
    segments.forEach(function (seg) {
      var width = scale > 0 ? (100 * seg[1]) / scale : 0;
      if (width > 0) {
        track.appendChild(el("div", { "class": "seg " + seg[0],
                                      style: "left:" + left + "%;width:" + width + "%" }));
        left += width;
      }
    });
    if (limitAt !== undefined && scale > 0) {
      track.appendChild(el("div", { "class": "limit",
                                    style: "left:calc(" + (100 * limitAt) / scale + "% - 2px)" }));
    }
    var row = el("div", Object.assign({ "class": "row", title: label }, attrs || {}),
                 [el("div", { "class": "label", text: label }), track,
                  el("div", { "class": "value", text: value })]);
    return row;
  }

  // Per-worker bars, or a histogram past HISTOGRAM_AT workers.
  function perWorker(view, workers, valueOf, format, scaleOf, label) {
    var body = view.body;
    clear(body);
    view.section.setAttribute("data-workers", String(workers.length));
    if (!workers.length) { body.appendChild(el("p", { "class": "empty", text: "No workers" })); return; }
    var values = workers.map(valueOf);
    if (workers.length > HISTOGRAM_AT) {
      view.section.setAttribute("data-mode", "histogram");
      histogram(body, values, label, format);
      return;
    }
    view.section.setAttribute("data-mode", "bars");
    var scale = Math.max.apply(null, workers.map(scaleOf).concat(values).concat([1e-9]));
    workers.slice().sort(byName).forEach(function (w) {
      var v = valueOf(w);
      body.appendChild(barRow(w.name, [["value", v]], scale, format(v),
                              { "data-worker": w.address, "data-value": String(v) }));
    });
  }

  function memoryClass(used, limit) {
    if (!limit) return "managed";
    var fraction = used / limit;
    return fraction > 0.95 ? "bad" : fraction > 0.6 ? "warn" : "managed";
  }

  var draw = {};

  draw["workers-memory"] = function (view, snap) {
    var workers = snap.workers, body = view.body;
    clear(body);
    view.section.setAttribute("data-workers", String(workers.length));
    if (!workers.length) { body.appendChild(el("p", { "class": "empty", text: "No workers" })); return; }
    if (workers.length > HISTOGRAM_AT) {
      view.section.setAttribute("data-mode", "histogram");
      histogram(body, workers.map(function (w) {
        return w.memory_limit ? (w.managed + w.unmanaged) / w.memory_limit : 0;
      }), "memory used of the limit", pct);
      return;
    }
    view.section.setAttribute("data-mode", "bars");
    var scale = Math.max.apply(null, workers.map(function (w) {
      return Math.max(w.memory_limit, w.managed + w.unmanaged + w.spilled);
    }).concat([1]));
    workers.slice().sort(byName).forEach(function (w) {
      var used = w.managed + w.unmanaged;
      var row = barRow(w.name, [[memoryClass(used, w.memory_limit), w.managed],
                                ["unmanaged", w.unmanaged], ["spilled", w.spilled]],
                       scale, bytes(used) + (w.memory_limit ? " / " + bytes(w.memory_limit) : ""),
                       { "class": "row worker-memory", "data-worker": w.address,
                         "data-managed": String(w.managed), "data-limit": String(w.memory_limit) },
                       w.memory_limit || undefined);
      body.appendChild(row);
    });
    body.appendChild(el("div", { "class": "legend" }, [
      el("span", { "class": "chip", style: "--chip: var(--managed)", text: "managed" }),
      el("span", { "class": "chip", style: "--chip: var(--unmanaged)", text: "unmanaged" }),
      el("span", { "class": "chip", style: "--chip: var(--spilled)", text: "spilled to disk" }),
      el("span", { "class": "chip", style: "--chip: var(--bad)", text: "memory limit" })]));
  };

  draw["cluster-memory"] = function (view, snap) {
    var m = snap.cluster.memory, body = view.body;
    clear(body);
    var used = m.managed + m.unmanaged, scale = Math.max(m.memory_limit, used + m.spilled, 1);
    view.section.setAttribute("data-managed", String(m.managed));
    body.appendChild(el("div", { "class": "stats" }, [
      el("div", { "class": "stat big", text: bytes(used) }),
      el("div", { "class": "stat", text: m.memory_limit ? "of " + bytes(m.memory_limit) + " limit"
                                                        : "(no memory limit)" })]));
    body.appendChild(barRow("cluster", [[memoryClass(used, m.memory_limit), m.managed],
                                        ["unmanaged", m.unmanaged], ["spilled", m.spilled]],
                            scale, pct(m.memory_limit ? used / m.memory_limit : null), {},
                            m.memory_limit || undefined));
    body.appendChild(el("div", { "class": "muted",
      text: "managed " + bytes(m.managed) + " · unmanaged " + bytes(m.unmanaged) +
            " · spilled " + bytes(m.spilled) }));
  };

  draw["nprocessing"] = function (view, snap) {
    perWorker(view, snap.workers, function (w) { return w.processing; }, String,
              function (w) { return w.nthreads; }, "tasks processing");
  };
  draw["occupancy"] = function (view, snap) {
    // dsched keeps no task durations: occupancy is tasks processing per thread.
    perWorker(view, snap.workers, function (w) { return w.nthreads ? w.processing / w.nthreads : 0; },
              function (x) { return x.toFixed(2); }, function () { return 1; },
              "tasks processing per thread");
  };
  draw["cpu"] = function (view, snap) {
    perWorker(view, snap.workers, function (w) { return (w.cpu || 0) / 100; }, pct,
              function (w) { return w.nthreads; }, "CPU (1 = one core)");
  };
  draw["workers-transfer-bytes"] = function (view, snap) {
    perWorker(view, snap.workers, function (w) { return w.incoming_bytes + w.outgoing_bytes; },
              bytes, function () { return 0; }, "bytes in transfer (incoming + outgoing)");
  };

  draw["progress"] = function (view, snap) {
    var rows = snap.progress, body = view.body, t = snap.totals;
    clear(body);
    view.note.textContent = "total: " + t.all + ", waiting: " + t.waiting + ", queued: " +
      t.queued + ", processing: " + t.processing + ", in-memory: " + t.memory +
      ", no-worker: " + t["no-worker"] + ", erred: " + t.erred;
    view.section.setAttribute("data-prefixes", rows.map(function (r) { return r.prefix; }).join(","));
    if (!rows.length) { body.appendChild(el("p", { "class": "empty", text: "No tasks" })); return; }
    var scale = Math.max.apply(null, rows.map(function (r) { return r.all; }));
    rows.slice(0, PROGRESS_ROWS).forEach(function (r) {
      var done = r.memory + r.erred + r.released;
      var row = barRow(r.prefix, [["memory", r.memory], ["released", r.released], ["erred", r.erred],
                                  ["processing", r.processing], ["queued", r.queued],
                                  ["no-worker", r["no-worker"]], ["waiting", r.waiting]],
                       scale, done + " / " + r.all,
                       { "class": "row prefix", "data-prefix": r.prefix, "data-all": String(r.all),
                         "data-memory": String(r.memory), "data-erred": String(r.erred),
                         "data-processing": String(r.processing) });
      row.title = r.prefix + ": memory " + r.memory + ", processing " + r.processing +
        ", queued " + r.queued + ", waiting " + r.waiting + ", erred " + r.erred;
      body.appendChild(row);
    });
    if (rows.length > PROGRESS_ROWS) {
      body.appendChild(el("div", { "class": "muted", text: "and " + (rows.length - PROGRESS_ROWS) +
                                                           " more prefixes" }));
    }
    var legend = el("div", { "class": "legend" });
    ["memory", "released", "erred", "processing", "queued", "no-worker", "waiting"].forEach(function (s) {
      legend.appendChild(el("span", { "class": "chip", style: "--chip: var(--" + s + ")", text: s }));
    });
    body.appendChild(legend);
  };

  draw["workers"] = function (view, snap) {
    var body = view.body, workers = snap.workers.slice().sort(byName);
    clear(body);
    view.section.setAttribute("data-workers", String(workers.length));
    var head = ["name", "address", "status", "threads", "processing", "in memory", "managed",
                "unmanaged", "limit", "memory %", "cpu", "last seen"];
    var table = el("table", {}, [el("thead", {}, [el("tr", {}, head.map(function (h) {
      return el("th", { text: h });
    }))])]);
    var tbody = el("tbody");
    workers.slice(0, TABLE_ROWS).forEach(function (w) {
      var used = w.managed + w.unmanaged;
      var cells = [w.name, w.address, w.status, w.nthreads, w.processing, w.in_memory, bytes(w.managed),
                   bytes(w.unmanaged), bytes(w.memory_limit),
                   w.memory_limit ? pct(used / w.memory_limit) : "–",
                   w.cpu === null ? "–" : w.cpu.toFixed(0) + "%",
                   w.last_seen ? seconds(Math.max(0, snap.time - w.last_seen)) + " ago" : "–"];
      tbody.appendChild(el("tr", { "data-worker": w.address }, cells.map(function (c) {
        return el("td", { text: String(c) });
      })));
    });
    table.appendChild(tbody);
    body.appendChild(table);
    if (workers.length > TABLE_ROWS) {
      body.appendChild(el("div", { "class": "muted",
                                   text: "showing " + TABLE_ROWS + " of " + workers.length + " workers" }));
    }
  };

  draw["exceptions"] = function (view, snap) {
    var body = view.body, exceptions = snap.exceptions;
    clear(body);
    view.section.setAttribute("data-exceptions", String(exceptions.length));
    if (!exceptions.length) { body.appendChild(el("p", { "class": "empty", text: "No exceptions" })); return; }
    exceptions.forEach(function (e) {
      body.appendChild(el("details", { "class": "exception", "data-key": e.key }, [
        el("summary", {}, [el("b", { text: e.key }), document.createTextNode(" "),
                           el("span", { text: e.exception }),
                           el("span", { "class": "where", text: "  on " + e.worker })]),
        el("pre", { text: e.traceback || "(no traceback)" })]));
    });
  };

  function sparkline(values, format, label) {
    var w = 600, h = 80, chart = svg("svg", { viewBox: "0 0 " + w + " " + h, "class": "spark",
                                               preserveAspectRatio: "none" });
    var max = Math.max.apply(null, values.concat([1e-9]));
    if (values.length > 1) {
      var points = values.map(function (v, i) {
        return ((i * w) / (values.length - 1)).toFixed(1) + "," + (h - (v / max) * h).toFixed(1);
      });
      chart.appendChild(svg("polyline", { points: points.join(" "), fill: "none",
                                          stroke: "var(--processing)", "stroke-width": 1.5 }));
    }
    return el("div", {}, [el("div", { "class": "muted", text: label + " (max " + format(max) + ")" }),
                          chart]);
  }

  draw["scheduler-system"] = function (view, snap) {
    var s = snap.scheduler, body = view.body;
    clear(body);
    view.section.setAttribute("data-samples", String(s.history.cpu.length));
    body.appendChild(el("div", { "class": "stats" }, [
      el("div", { "class": "stat" }, [el("span", { text: "scheduler CPU" }),
                                      el("b", { "class": "big", text: pct(s.cpu) })]),
      el("div", { "class": "stat" }, [el("span", { text: "event-loop lag" }),
                                      el("b", { "class": "big", text: seconds(s.lag) })]),
      el("div", { "class": "stat" }, [el("span", { text: "scheduler memory" }),
                                      el("b", { "class": "big", text: bytes(s.rss) })]),
      el("div", { "class": "stat" }, [el("span", { text: "tasks" }),
                                      el("b", { "class": "big", text: String(snap.cluster.tasks) })])]));
    body.appendChild(sparkline(s.history.cpu, pct, "CPU, last " + s.history.cpu.length + " s"));
    body.appendChild(sparkline(s.history.lag, seconds, "event-loop lag"));
  };

  // ------------------------------------------------------------------ the task stream
  var stream = { cursor: null, bars: [], dropped: 0 };

  function rowsOf(bars) {
    // Row key per bar: worker and thread; one per worker past MAX_ROWS; then groups of workers.
    var threads = {}, workers = {};
    bars.forEach(function (b) { threads[b[0] + " " + b[1]] = 1; workers[b[0]] = 1; });
    var workerList = Object.keys(workers).sort();
    var threadList = Object.keys(threads).sort();
    if (threadList.length <= MAX_ROWS) {
      return { mode: "threads", count: threadList.length, labels: threadList,
               rowOf: (function (index) { return function (b) { return index[b[0] + " " + b[1]]; }; })(
                 indexOf(threadList)) };
    }
    var byWorker = indexOf(workerList);
    if (workerList.length <= MAX_ROWS) {
      return { mode: "workers", count: workerList.length, labels: workerList,
               rowOf: function (b) { return byWorker[b[0]]; } };
    }
    var per = Math.ceil(workerList.length / MAX_ROWS);
    return { mode: "worker-groups", count: Math.ceil(workerList.length / per), labels: [],
             rowOf: function (b) { return Math.floor(byWorker[b[0]] / per); } };
  }
  function indexOf(list) { var index = {}; list.forEach(function (k, i) { index[k] = i; }); return index; }

  function drawStream(view) {
    var bars = stream.bars, body = view.body, section = view.section;
    var canvas = body.querySelector("canvas");
    if (!canvas) {
      clear(body);
      canvas = el("canvas");
      body.appendChild(canvas);
      body.appendChild(el("div", { "class": "tooltip" }));
      canvas.addEventListener("mousemove", function (event) { hover(view, event); });
      canvas.addEventListener("mouseleave", function () { body.querySelector(".tooltip").style.display = "none"; });
    }
    var prefixes = {}, workers = {}, transfers = 0, keys = {};
    bars.forEach(function (b) {
      workers[b[0]] = 1; keys[b[6]] = 1;
      if (b[3] === "transfer") transfers++; else prefixes[b[2]] = (prefixes[b[2]] || 0) + 1;
    });
    var rows = rowsOf(bars);
    section.setAttribute("data-bars", String(bars.length));
    section.setAttribute("data-tasks", String(Object.keys(keys).length));
    section.setAttribute("data-transfers", String(transfers));
    section.setAttribute("data-rows", String(rows.count));
    section.setAttribute("data-row-mode", rows.mode);
    section.setAttribute("data-workers", Object.keys(workers).sort().join(","));
    section.setAttribute("data-prefixes", Object.keys(prefixes).sort().join(","));
    section.setAttribute("data-cursor", String(stream.cursor));
    view.note.textContent = bars.length ? bars.length + " bars, " + rows.count + " rows (" + rows.mode + ")"
                                        : "waiting for tasks";
    var legend = body.querySelector(".legend") || body.appendChild(el("div", { "class": "legend" }));
    clear(legend);
    Object.keys(prefixes).sort(function (a, b) { return prefixes[b] - prefixes[a]; }).slice(0, 16)
      .forEach(function (p) {
        legend.appendChild(el("span", { "class": "chip", "data-prefix": p,
                                        style: "--chip: " + prefixColor(p), text: p }));
      });
    if (transfers) legend.appendChild(el("span", { "class": "chip", style: "--chip: " + ACTION_COLORS.transfer,
                                                   text: "transfer" }));

    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || 600, height = canvas.clientHeight || 300;
    canvas.width = width * ratio; canvas.height = height * ratio;
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    if (!bars.length) return;
    var end = -Infinity, begin = Infinity;
    bars.forEach(function (b) { if (b[5] > end) end = b[5]; if (b[4] < begin) begin = b[4]; });
    begin = Math.max(begin, end - WINDOW_S);
    var span = Math.max(end - begin, 1e-3), axis = 16, plot = height - axis;
    var rowHeight = plot / Math.max(rows.count, 1);
    var x = function (t) { return ((t - begin) / span) * width; };
    view.layout = { begin: begin, span: span, rowHeight: rowHeight, rows: rows, width: width };
    bars.forEach(function (b) {
      if (b[5] < begin) return;
      var row = rows.rowOf(b);
      ctx.fillStyle = barColor(b);
      ctx.fillRect(x(b[4]), row * rowHeight + (rowHeight > 4 ? 1 : 0),
                   Math.max(x(b[5]) - x(b[4]), 1), Math.max(rowHeight - (rowHeight > 4 ? 2 : 0), 1));
    });
    ctx.fillStyle = "#6b7280"; ctx.font = "10px system-ui, sans-serif";
    for (var i = 0; i <= 4; i++) {
      var t = begin + (span * i) / 4;
      ctx.textAlign = i === 0 ? "left" : i === 4 ? "right" : "center";
      ctx.fillText("-" + (end - t).toFixed(span < 2 ? 2 : span < 20 ? 1 : 0) + " s", x(t), height - 3);
    }
  }

  function hover(view, event) {
    var layout = view.layout, tip = view.body.querySelector(".tooltip");
    if (!layout) return;
    var rect = event.target.getBoundingClientRect();
    var t = layout.begin + ((event.clientX - rect.left) / layout.width) * layout.span;
    var row = Math.floor((event.clientY - rect.top) / layout.rowHeight);
    var found = null;
    for (var i = stream.bars.length - 1; i >= 0; i--) {
      var b = stream.bars[i];
      if (b[4] <= t && t <= b[5] && layout.rows.rowOf(b) === row) { found = b; break; }
    }
    if (!found) { tip.style.display = "none"; return; }
    tip.textContent = found[6] + " · " + found[3] + " " + seconds(found[5] - found[4]) + " · " + found[0];
    tip.style.left = (event.clientX - rect.left + 12) + "px";
    tip.style.top = (event.clientY - rect.top + 12) + "px";
    tip.style.display = "block";
  }

  // ------------------------------------------------------------------ polling
  function connection(state) {
    var dot = document.getElementById("connection");
    if (dot) dot.setAttribute("data-state", state);
    document.body.setAttribute("data-connection", state);
  }

  function summary(snap) {
    var node = document.getElementById("summary");
    if (!node) return;
    var c = snap.cluster;
    node.textContent = (snap.scheduler.address || "scheduler") + " · " + c.workers + " workers · " +
      c.threads + " threads · " + c.tasks + " tasks · " + c.processing + " processing";
  }

  var snapshots = 0;
  function pollSnapshot() {
    fetch("dashboard/snapshot.json", { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (snap) {
        snapshots++;
        document.body.setAttribute("data-snapshots", String(snapshots));
        connection("ok");
        summary(snap);
        views.forEach(function (view) {
          if (draw[view.name]) {
            try { draw[view.name](view, snap); } catch (error) { view.note.textContent = String(error); }
          }
        });
      })
      .catch(function () { connection("error"); })
      .then(function () { setTimeout(pollSnapshot, POLL_MS); });
  }

  function pollStream() {
    var url = "dashboard/task-stream.json" + (stream.cursor === null ? "" : "?since=" + stream.cursor);
    fetch(url, { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (delta) {
        stream.cursor = delta.cursor;
        stream.dropped += delta.dropped;
        if (delta.bars.length) {
          stream.bars = stream.bars.concat(delta.bars);
          if (stream.bars.length > MAX_BARS) stream.bars = stream.bars.slice(stream.bars.length - MAX_BARS);
        }
        views.forEach(function (view) { if (view.name === "task-stream") drawStream(view); });
      })
      .catch(function () { connection("error"); })
      .then(function () { setTimeout(pollStream, POLL_MS); });
  }

  function start() {
    var individual = document.getElementById("individual");
    if (individual) {
      // /individual-task-stream -> "task-stream" (Dask's individual-plot route names).
      var last = location.pathname.replace(/\/+$/, "").split("/").pop() || "";
      var name = last.replace(/^individual-/, "");
      individual.setAttribute("data-view", name);
      document.title = "dsched: " + (TITLES[name] || name);
    }
    Array.prototype.forEach.call(document.querySelectorAll("section.view"), setUp);
    if (!views.length) return;
    pollSnapshot();
    if (views.some(function (view) { return view.name === "task-stream"; })) pollStream();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
