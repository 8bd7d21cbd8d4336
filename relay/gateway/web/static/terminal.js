// The web terminal's page (relay/gateway/web/terminal.py): xterm.js on a WebSocket at
// terminal/ws beside this page. Binary messages carry terminal bytes both ways; the page
// sends {"resize": [cols, rows]} as text when the window changes size and receives
// {"exit": status} when the shell ended. The admin token travels in the HttpOnly cookie
// the sign-in form set: this script never sees it.
(function () {
  "use strict";
  var status = document.getElementById("status");
  var term = new Terminal({ cursorBlink: true, scrollback: 5000, fontSize: 14,
                            fontFamily: "ui-monospace, Menlo, Consolas, 'DejaVu Sans Mono', monospace" });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();

  var url = new URL("terminal/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "?cols=" + term.cols + "&rows=" + term.rows;
  var socket = new WebSocket(url.href);
  socket.binaryType = "arraybuffer";
  var encoder = new TextEncoder();
  var state = { open: false, closed: false, exitStatus: null, closeCode: null, closeReason: "" };

  function say(text) { status.textContent = text; }

  socket.onopen = function () {
    state.open = true;
    say("connected");
    term.focus();
  };
  socket.onmessage = function (event) {
    if (typeof event.data === "string") {
      var message = JSON.parse(event.data);
      if (message && typeof message.exit === "number") {
        state.exitStatus = message.exit;
        say("the shell exited with status " + message.exit);
      }
      return;
    }
    term.write(new Uint8Array(event.data));
  };
  socket.onclose = function (event) {
    state.open = false;
    state.closed = true;
    state.closeCode = event.code;
    state.closeReason = event.reason;
    if (state.exitStatus === null) {
      say("disconnected" + (event.reason ? ": " + event.reason : " (" + event.code + ")"));
    }
    term.options.cursorBlink = false;
  };

  term.onData(function (data) {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  term.onBinary(function (data) {  // e.g. some mouse reports: one byte per character
    if (socket.readyState !== WebSocket.OPEN) return;
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    socket.send(bytes);
  });
  term.onResize(function (size) {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ resize: [size.cols, size.rows] }));
  });
  window.addEventListener("resize", function () { fit.fit(); });

  // For scripts driving the page (and the test suite): the terminal and the socket's state.
  window.relayTerminal = { term: term, state: state };
})();
