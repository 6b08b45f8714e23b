// The call page's player: click a word (or a time, or the waveform) to seek the recording there, and
// the word being said marked while it plays. Plain JS served from the package: no framework, no CDN.
(function () {
  "use strict";
  var audio = document.getElementById("audio");
  if (!audio) return;
  function seek(seconds) {
    audio.currentTime = Math.max(0, seconds);
    var playing = audio.play();
    if (playing && playing.catch) playing.catch(function () {});  // autoplay refused: the seek stays
  }
  document.addEventListener("click", function (e) {
    var el = e.target.closest("[data-t]");
    if (el) { seek(parseFloat(el.getAttribute("data-t")) / 1000); return; }
    var wave = e.target.closest("svg.wave");
    if (wave && audio.duration) {
      var box = wave.getBoundingClientRect();
      seek(audio.duration * (e.clientX - box.left) / box.width);
    }
  });
  var words = Array.prototype.slice.call(document.querySelectorAll(".transcript .w"));
  var head = document.getElementById("playhead");
  var wave = document.querySelector("svg.wave");
  audio.addEventListener("timeupdate", function () {
    var ms = audio.currentTime * 1000, current = null;
    for (var i = 0; i < words.length; i++) {
      var t = parseFloat(words[i].getAttribute("data-t"));
      if (t <= ms && (!current || t >= parseFloat(current.getAttribute("data-t")))) current = words[i];
    }
    words.forEach(function (w) { w.classList.toggle("now", w === current); });
    if (head && wave && audio.duration) {
      var x = wave.viewBox.baseVal.width * audio.currentTime / audio.duration;
      head.setAttribute("x1", x); head.setAttribute("x2", x);
    }
  });
})();
