// upkeepctl dashboard: follows a run live. The page is complete without this script; with it, the run's tree
// rows are updated in place from the dashboard's Server-Sent Events (fed by the hub's WatchRun stream).
// Only textContent and data attributes are written: nothing from the hub is parsed as HTML.
(function () {
  "use strict";
  var live = { updates: 0, ended: false };
  window.upkeepLive = live;
  var section = document.querySelector("[data-live]");
  var note = document.getElementById("live-state");
  if (!section || !window.EventSource) { return; }
  var rows = {};
  document.querySelectorAll("tr[data-level]").forEach(function (tr) { rows[tr.getAttribute("data-level")] = tr; });
  var fields = ["status", "progress", "started", "ended", "message"];
  var say = function (text) { if (note) { note.textContent = text; } };
  var source = new EventSource(section.getAttribute("data-live"));
  source.addEventListener("run", function (ev) {
    var data = JSON.parse(ev.data);
    (data.rows || []).forEach(function (r) {
      var tr = rows[r.key];
      if (!tr) { return; }
      fields.forEach(function (f) {
        var cell = tr.querySelector("td." + f);
        if (cell && cell.textContent !== r[f]) { cell.textContent = r[f]; }
        if (cell && f === "status") { cell.setAttribute("data-status", r.status); }
      });
    });
    live.updates += 1;
    say("Live: updated " + new Date().toLocaleTimeString() + ".");
  });
  source.addEventListener("problem", function (ev) {
    var data = JSON.parse(ev.data);
    say("Live updates: " + (data.error || "the hub did not answer") + "; retrying.");
  });
  source.addEventListener("end", function () {
    live.ended = true;
    source.close();
    say("The run is final; live updates ended.");
  });
  source.onerror = function () { if (!live.ended) { say("Live updates interrupted; reconnecting."); } };
}());
