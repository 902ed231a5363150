// The dashboard: reads /v1/stats with an admin key and shows it. The key comes from the URL's
// fragment (#key=..., never sent to a server) or the form, and lives in this tab's
// sessionStorage only. Everything is written with textContent: no server string becomes HTML.
"use strict";

(function () {
  const STORE = "parity-sandbox-admin-key";
  const POLL_MS = 5000;
  let chart = null;

  window.addEventListener("error", function () {
    document.body.dataset.errors = String(Number(document.body.dataset.errors) + 1);
  });

  function takeKeyFromFragment() {
    const match = /^#key=(.+)$/.exec(window.location.hash);
    if (match) {
      sessionStorage.setItem(STORE, decodeURIComponent(match[1]));
      history.replaceState(null, "", window.location.pathname);
    }
  }

  function status(text, bad) {
    const element = document.getElementById("status");
    element.textContent = text;
    element.className = bad ? "bad" : "";
  }

  function fill(tableId, rows) {
    const body = document.querySelector("#" + tableId + " tbody");
    body.replaceChildren();
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const cell of row) {
        const td = document.createElement("td");
        td.textContent = cell.text;
        if (cell.className) td.className = cell.className;
        if (cell.value !== undefined) td.dataset.value = String(cell.value);
        tr.appendChild(td);
      }
      if (row.id) tr.id = row.id;
      body.appendChild(tr);
    }
  }

  function number(id, value) {
    const element = document.getElementById(id);
    element.textContent = String(value);
    element.dataset.value = String(value);
  }

  function show(stats) {
    number("queued", stats.queued);
    number("running", stats.running);
    number("running-here", stats.running_here);
    number("queue-limit", stats.queue_limit);
    fill("ended", Object.entries(stats.ended_last_hour).map(([state, count]) => {
      const row = [{ text: state }, { text: String(count), value: count, className: "num" }];
      row.id = "ended-" + state;
      return row;
    }));
    const series = stats.events_per_minute;
    const kinds = Object.keys(series.counts).sort();
    fill("events-total", kinds.map((kind) => {
      const total = series.counts[kind].reduce((a, b) => a + b, 0);
      const row = [{ text: kind }, { text: String(total), value: total, className: "num" }];
      row.id = "events-" + kind;
      return row;
    }));
    fill("top-keys", stats.top_keys_by_cpu.map((entry) => [
      { text: entry.key },
      { text: entry.cpu_seconds.toFixed(3), value: entry.cpu_seconds, className: "num" },
    ]));
    fill("runtimes", stats.runtimes.map((runtime) => [
      { text: runtime.name },
      { text: runtime.ok ? "yes" : "no", className: runtime.ok ? "good" : "bad" },
      { text: runtime.detail },
    ]));
    drawChart(series, kinds);
    document.getElementById("main").hidden = false;
    document.body.dataset.loaded = "1";
    document.body.dataset.statsTime = String(stats.time);
    status("updated " + new Date(stats.time * 1000).toLocaleTimeString(), false);
  }

  function drawChart(series, kinds) {
    const labels = series.minutes.map((t) => new Date(t * 1000).toLocaleTimeString([], {
      hour: "2-digit", minute: "2-digit",
    }));
    const palette = ["#c0392b", "#2980b9", "#8e44ad", "#16a085", "#d35400", "#2c3e50",
      "#f39c12", "#7f8c8d", "#27ae60", "#e84393", "#6c5ce7"];
    const datasets = kinds.map((kind, i) => ({
      label: kind, data: series.counts[kind], backgroundColor: palette[i % palette.length],
    }));
    if (typeof Chart === "undefined") {
      status("the chart library did not load", true);
      return;
    }
    if (chart === null) {
      chart = new Chart(document.getElementById("events-chart"), {
        type: "bar",
        data: { labels: labels, datasets: datasets },
        options: {
          animation: false, maintainAspectRatio: false,
          scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true,
            ticks: { precision: 0 } } },
        },
      });
    } else {
      chart.data.labels = labels;
      chart.data.datasets = datasets;
      chart.update();
    }
  }

  async function load() {
    const key = sessionStorage.getItem(STORE);
    if (!key) {
      document.getElementById("key-form").hidden = false;
      return;
    }
    let response;
    try {
      response = await fetch("/v1/stats", {
        headers: { Authorization: "Bearer " + key }, cache: "no-store",
      });
    } catch (error) {
      status("cannot reach the server", true);
      return;
    }
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(STORE);
      document.getElementById("key-form").hidden = false;
      status("that key is not a live admin key", true);
      return;
    }
    if (!response.ok) {
      status("the server answered " + response.status, true);
      return;
    }
    show(await response.json());
  }

  document.getElementById("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    const input = document.getElementById("key-input");
    sessionStorage.setItem(STORE, input.value.trim());
    input.value = "";
    document.getElementById("key-form").hidden = true;
    load();
  });

  takeKeyFromFragment();
  load();
  setInterval(load, POLL_MS);
})();
