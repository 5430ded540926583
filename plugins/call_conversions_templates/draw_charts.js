// Each chart's Vega-Lite spec sits in a JSON script beside it; vega-embed (served by this page's
// own app, never from the internet) draws it as SVG. Without the script the table still has every number.
(function () {
  var charts = document.querySelectorAll("div.chart[data-spec]");
  for (var i = 0; i < charts.length; i++) {
    var chart = charts[i];
    var spec = JSON.parse(document.getElementById(chart.getAttribute("data-spec")).textContent);
    if (typeof vegaEmbed !== "function") {
      chart.textContent = "The chart's script did not load; the table below has the same numbers.";
      continue;
    }
    (function (element) {
      vegaEmbed(element, spec, { renderer: "svg", actions: false })
        .then(function () { element.setAttribute("data-drawn", "true"); })
        .catch(function (error) { element.textContent = "The chart could not be drawn: " + error; });
    })(chart);
  }
})();
