// wxauto-sidecar status page: refreshes the server-rendered body every 5 s and applies the
// reader's language (?lang=, else the stored choice, else navigator.language). Without this
// script the page still shows every figure, as rendered by the server.
(function () {
  "use strict";
  var KEY = "wxauto-sidecar.lang";
  var PERIOD_MS = 5000;

  function stored() {
    try { return window.localStorage.getItem(KEY); } catch (e) { return null; }
  }
  function store(lang) {
    try { window.localStorage.setItem(KEY, lang); } catch (e) { /* private mode */ }
  }
  function known(lang) {
    return lang === "zh" || lang === "en" ? lang : null;
  }
  function fromNavigator() {
    var lang = (navigator.language || "").toLowerCase();
    return lang.indexOf("zh") === 0 ? "zh" : "en";
  }

  var params = new URLSearchParams(window.location.search);
  var lang = known(params.get("lang")) || known(stored()) || fromNavigator();

  function app() { return document.getElementById("app"); }

  // Times are rendered in UTC by the server; show them in the reader's local time.
  function localTimes(root) {
    var locale = lang === "zh" ? "zh-CN" : "en-GB";
    var nodes = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < nodes.length; i++) {
      var time = new Date(nodes[i].getAttribute("datetime"));
      if (!isNaN(time.getTime())) {
        nodes[i].title = nodes[i].textContent;
        var today = time.toDateString() === new Date().toDateString();
        nodes[i].textContent = today
          ? time.toLocaleTimeString(locale, { hour12: false })
          : time.toLocaleString(locale, { hour12: false });
      }
    }
  }

  function applied(root) {
    document.documentElement.lang = root.getAttribute("data-lang") || lang;
    document.title = root.getAttribute("data-title") || document.title;
    localTimes(root);
  }

  var busy = false;
  var refreshes = 0;
  function refresh() {
    if (busy) { return; }
    busy = true;
    // Relative, so the page also works behind a reverse proxy under a path prefix.
    var url = "?fragment=1&lang=" + encodeURIComponent(lang);
    fetch(url, { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var holder = document.createElement("div");
        holder.innerHTML = html;
        var next = holder.firstElementChild;
        var current = app();
        if (next && current) {
          current.replaceWith(next);
          applied(next);
          refreshes += 1;
          document.body.setAttribute("data-refreshes", String(refreshes));
        }
      })
      .catch(function () {
        var current = app();
        var live = document.getElementById("live");
        if (current && live) {
          live.textContent = current.getAttribute("data-failed");
          live.className = "failed";
        }
      })
      .then(function () { busy = false; });
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a[data-lang]") : null;
    if (!link) { return; }
    event.preventDefault();
    lang = link.getAttribute("data-lang");
    store(lang);
    var url = new URL(window.location.href);
    url.searchParams.set("lang", lang);
    window.history.replaceState(null, "", url.toString());
    refresh();
  });

  var root = app();
  if (root && root.getAttribute("data-lang") !== lang) {
    refresh();
  } else if (root) {
    applied(root);
  }
  window.setInterval(function () {
    if (!document.hidden) { refresh(); }
  }, PERIOD_MS);
})();
