// The flow editor (web/editor.py): a click on an error's line, or on a line of the numbered copy,
// selects that line in the text box. Served from the package (the panel's CSP allows no inline script).
(function () {
  var box = document.getElementById("flow-text");
  if (!box) return;
  function selectLine(n) {
    var lines = box.value.split("\n");
    if (n < 1 || n > lines.length) return;
    var start = 0;
    for (var i = 0; i < n - 1; i++) start += lines[i].length + 1;
    box.focus();
    box.setSelectionRange(start, start + lines[n - 1].length);
    var per = box.scrollHeight / Math.max(lines.length, 1);
    box.scrollTop = Math.max(0, (n - 3) * per);
  }
  document.addEventListener("click", function (e) {
    var el = e.target.closest("[data-line]");
    if (!el || !(el.classList.contains("jump") || el.closest("#flow-lines"))) return;
    e.preventDefault();
    selectLine(parseInt(el.getAttribute("data-line"), 10));
  });
  var err = document.getElementById("flow-error");
  if (err && err.hasAttribute("data-line")) selectLine(parseInt(err.getAttribute("data-line"), 10));
})();
