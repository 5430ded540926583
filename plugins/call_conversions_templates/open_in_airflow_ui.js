// The Airflow UI shows this page in a sandboxed frame that may not navigate the whole window, but
// may reach it (same origin). A link into the Airflow UI is therefore opened by the UI's own router
// (history.pushState + popstate); opened on its own, or if that is refused, a link works as usual.
document.addEventListener("click", function (event) {
  var link = event.target.closest ? event.target.closest("a[data-airflow-ui]") : null;
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  if (window.top === window) return;
  try {
    var ui = window.top;
    if (ui.location.origin !== window.location.origin) return;
    ui.history.pushState(null, "", link.href);
    ui.dispatchEvent(new PopStateEvent("popstate", { state: null }));
    event.preventDefault();
  } catch (error) {}
});
