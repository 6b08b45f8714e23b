// The live calls page (web/live.py): keeps the server-rendered calls current from /live/events (server-sent
// events: a snapshot, then each change), ticks their durations, and removes a call at its hang-up. Every
// text goes in as textContent (never as HTML). Plain JS served from the package: no framework, no CDN.
(function () {
  "use strict";
  var root = document.getElementById("live");
  if (!root || !window.EventSource) return;
  var csrf = root.getAttribute("data-csrf");
  var act = !!root.getAttribute("data-act");
  var skew = parseFloat(root.getAttribute("data-now")) - Date.now() / 1000;  // server clock - ours
  var status = document.getElementById("live-status");
  var empty = document.getElementById("live-empty");

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function sections() { return Array.prototype.slice.call(root.querySelectorAll("section.live-call")); }
  function find(id) {
    return sections().filter(function (s) { return s.getAttribute("data-call-id") === id; })[0] || null;
  }
  function counted() {
    var n = sections().length;
    if (empty) empty.hidden = n > 0;
    if (status) status.textContent = n + " in progress";
  }
  function form(id, what) {
    var f = el("form", what);
    f.method = "post";
    f.action = "/live/" + encodeURIComponent(id) + "/" + what;
    var token = el("input"); token.type = "hidden"; token.name = "csrf"; token.value = csrf;
    f.appendChild(token);
    if (what === "transfer") {
      var target = el("input"); target.name = "target"; target.required = true; target.size = 28;
      target.placeholder = "sip:agent@pbx.example.com";
      f.appendChild(target);
      var label = el("label", "attended");
      label.title = "call them first: the caller is sent only once they answer, and stays with the bot if they do not";
      var box = el("input"); box.type = "checkbox"; box.name = "attended";
      label.appendChild(box);
      label.appendChild(document.createTextNode(" once they answer"));
      f.appendChild(label);
    }
    f.appendChild(el("button", null, what === "hangup" ? "Hang up" : "Transfer"));
    return f;
  }
  function build(c) {
    var s = el("section", "live-call");
    s.setAttribute("data-call-id", c.call_id);
    var head = el("div", "live-head");
    ["bot", "tag tenant", "remote", "state", "duration", "speaking", "transfer"].forEach(function (k) {
      head.appendChild(el(k === "bot" ? "b" : "span", k));
    });
    var speaking = head.querySelector(".speaking");
    speaking.appendChild(el("span", "leg caller", "caller"));
    speaking.appendChild(document.createTextNode(" "));
    speaking.appendChild(el("span", "leg bot", "bot"));
    s.appendChild(head);
    s.appendChild(el("div", "live-lines"));
    if (act) {
      var actions = el("div", "live-actions");
      actions.appendChild(form(c.call_id, "hangup"));
      actions.appendChild(form(c.call_id, "transfer"));
      actions.appendChild(el("button", "listen", "Listen"));
      s.appendChild(actions);
    }
    root.appendChild(s);
    return s;
  }
  function header(s, c) {
    s.setAttribute("data-started", c.started);
    s.querySelector(".bot").textContent = c.bot || "-";
    s.querySelector(".tenant").textContent = c.tenant || "no tenant";
    s.querySelector(".remote").textContent = c.direction + " · " + c.remote;
    state(s, c.state);
    speaking(s, c.speaking || {});
    s.querySelector(".transfer").textContent = c.transfer ? "transfer " + c.transfer : "";
  }
  function state(s, name) {
    var box = s.querySelector(".state");
    box.textContent = "";
    if (name) { box.appendChild(document.createTextNode("state ")); box.appendChild(el("b", null, name)); }
  }
  function speaking(s, on) {
    s.querySelector(".leg.caller").classList.toggle("on", !!on.caller);
    s.querySelector(".leg.bot").classList.toggle("on", !!on.bot);
  }
  function line(s, index, leg, text, final) {
    var box = s.querySelector(".live-lines");
    var row = box.querySelector('[data-index="' + index + '"]');
    if (!row) {
      row = el("div");
      row.setAttribute("data-index", index);
      row.appendChild(el("span", "who", leg));
      row.appendChild(document.createTextNode(" "));
      row.appendChild(el("span", "text"));
      box.appendChild(row);
      while (box.children.length > 200) box.removeChild(box.firstChild);
    }
    row.className = "live-line " + leg + (final ? "" : " partial");
    row.querySelector(".text").textContent = text;
    box.scrollTop = box.scrollHeight;
  }
  function upsert(c) {
    var s = find(c.call_id) || build(c);
    header(s, c);
    return s;
  }
  function snapshot(u) {
    skew = u.now - Date.now() / 1000;
    var keep = {};
    u.calls.forEach(function (c) {
      keep[c.call_id] = true;
      var s = upsert(c);
      s.querySelector(".live-lines").textContent = "";
      c.lines.forEach(function (l, i) { line(s, c.first_line + i, l.leg, l.text, l.final); });
    });
    sections().forEach(function (s) { if (!keep[s.getAttribute("data-call-id")]) s.remove(); });
    counted();
    tick();
  }
  function tick() {
    var now = Date.now() / 1000 + skew;
    sections().forEach(function (s) {
      var t = Math.max(0, Math.floor(now - parseFloat(s.getAttribute("data-started"))));
      s.querySelector(".duration").textContent = Math.floor(t / 60) + ":" + ("0" + (t % 60)).slice(-2);
    });
  }
  // listening in: the call's audio from /live/ID/listen (16-bit PCM, x-sample-rate), played with the Web
  // Audio API a little ahead of now; one call at a time, stopped by the button, the call's end or the page
  var listening = null;
  function stopListening() {
    if (!listening) return;
    listening.controller.abort();
    listening.ctx.close();
    listening.button.textContent = "Listen";
    listening.button.classList.remove("on");
    listening = null;
  }
  function listen(s, button) {
    var id = s.getAttribute("data-call-id");
    var was = listening && listening.id;
    stopListening();
    var Ctx = window.AudioContext || window.webkitAudioContext;
    if (was === id || !Ctx || !window.fetch || !window.AbortController) return;
    var ctx = new Ctx(), controller = new AbortController(), heard = 0, next = 0, odd = null;
    listening = {id: id, controller: controller, ctx: ctx, button: button};
    button.textContent = "Stop listening";
    button.classList.add("on");
    function play(bytes, rate) {
      if (odd !== null) {  // a sample split between two pieces of the stream
        var joined = new Uint8Array(bytes.length + 1);
        joined[0] = odd; joined.set(bytes, 1); bytes = joined; odd = null;
      }
      if (bytes.length % 2) { odd = bytes[bytes.length - 1]; bytes = bytes.subarray(0, bytes.length - 1); }
      var n = bytes.length / 2;
      if (!n) return;
      var view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
      var buffer = ctx.createBuffer(1, n, rate), data = buffer.getChannelData(0);
      for (var i = 0; i < n; i++) data[i] = view.getInt16(2 * i, true) / 32768;
      var node = ctx.createBufferSource();
      node.buffer = buffer;
      node.connect(ctx.destination);
      next = Math.max(next, ctx.currentTime + 0.15);  // pieces come about every 100 ms
      node.start(next);
      next += n / rate;
      heard += n;
      s.setAttribute("data-heard", heard.toString());
    }
    fetch("/live/" + encodeURIComponent(id) + "/listen", {signal: controller.signal, credentials: "same-origin"})
      .then(function (r) {
        if (!r.ok || !r.body) throw new Error("refused: " + r.status);
        var rate = parseInt(r.headers.get("x-sample-rate"), 10) || 8000, reader = r.body.getReader();
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) { if (listening && listening.id === id) stopListening(); return; }
            play(chunk.value, rate);
            return pump();
          });
        }
        return pump();
      })
      .catch(function () { if (listening && listening.id === id) stopListening(); });
  }
  root.addEventListener("click", function (e) {
    var button = e.target.closest ? e.target.closest("button.listen") : null;
    if (button) listen(button.closest("section.live-call"), button);
  });

  var source = new EventSource("/live/events");
  source.onmessage = function (m) {
    var u = JSON.parse(m.data), s = u.call_id ? find(u.call_id) : null;
    if (u.type === "snapshot") snapshot(u);
    else if (u.type === "call") { upsert(u.call); counted(); tick(); }
    else if (u.type === "ended") {
      if (listening && listening.id === u.call_id) stopListening();
      if (s) s.remove();
      counted();
    }
    else if (u.type === "line" && s) line(s, u.index, u.leg, u.text, u.final);
    else if (u.type === "speaking" && s) speaking(s, u);
    else if (u.type === "state" && s) state(s, u.state);
    else if (u.type === "closed") { source.close(); if (status) status.textContent = "serve stopped"; }
    root.setAttribute("data-updates", (parseInt(root.getAttribute("data-updates") || "0", 10) + 1).toString());
  };
  source.onerror = function () { if (status && source.readyState !== 2) status.textContent = "reconnecting…"; };
  tick();
  setInterval(tick, 1000);
})();
