(function () {
  "use strict";
  // Sortable tables: click (or Enter on) a header; numbers sort numerically, missing values last.
  function cellKey(cell, numeric) {
    var raw = cell.getAttribute("data-sort");
    if (raw === null) raw = cell.textContent.trim();
    if (!numeric) return { missing: raw === "" || raw === "\u2014", value: raw.toLowerCase() };
    var value = parseFloat(raw);
    return { missing: isNaN(value), value: value };
  }
  function sortBy(table, th, col) {
    var numeric = th.getAttribute("data-type") === "num";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(th.parentNode.cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, i) { return { row: row, key: cellKey(row.cells[col], numeric), i: i }; });
    keyed.sort(function (a, b) {
      if (a.key.missing !== b.key.missing) return a.key.missing ? 1 : -1;
      var order = 0;
      if (a.key.value < b.key.value) order = -1;
      else if (a.key.value > b.key.value) order = 1;
      if (!ascending) order = -order;
      return order !== 0 ? order : a.i - b.i;
    });
    keyed.forEach(function (k) { body.appendChild(k.row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      if (th.classList.contains("nosort")) return;
      th.tabIndex = 0;
      th.classList.add("sorts");
      th.addEventListener("click", function () { sortBy(table, th, col); });
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(table, th, col); }
      });
    });
  });
  // Filters: a search box (matches any text in the row) and "hide pruned" for the table they name.
  function applyFilter(tableId) {
    var table = document.getElementById(tableId);
    if (!table) return;
    var box = document.querySelector('input.filter[data-table="' + tableId + '"]');
    var hide = document.querySelector('input.hide-pruned[data-table="' + tableId + '"]');
    var query = box ? box.value.trim().toLowerCase() : "";
    var hidePruned = hide ? hide.checked : false;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var show = (query === "" || row.textContent.toLowerCase().indexOf(query) !== -1) &&
        !(hidePruned && row.classList.contains("pruned"));
      row.hidden = !show;
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("input.filter, input.hide-pruned"), function (input) {
    input.addEventListener("input", function () { applyFilter(input.getAttribute("data-table")); });
    input.addEventListener("change", function () { applyFilter(input.getAttribute("data-table")); });
  });
  // Repeated images: each image's data is inlined once; its other places take their source from that one.
  Array.prototype.forEach.call(document.querySelectorAll("img[data-same]"), function (img) {
    var first = document.getElementById(img.getAttribute("data-same"));
    if (first) img.src = first.src;
  });
})();
