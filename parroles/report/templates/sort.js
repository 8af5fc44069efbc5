// Sort a table by the column whose heading is clicked: by data-v when the cell has one (a number; empty
// last), else by the text (numbers as numbers). A table with data-shown shows only its first rows (laying
// out 10,000 rows takes seconds); its "more" buttons show more of them.
function showFirst(table) {
  var shown = Number(table.getAttribute("data-shown") || Infinity);
  Array.prototype.forEach.call(table.tBodies[0].rows, function (row, index) { row.hidden = index >= shown; });
  var said = document.querySelector('.more[data-table="' + table.id + '"] span');
  if (said) { said.textContent = String(Math.min(shown, table.tBodies[0].rows.length)); }
}
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var keys = new Map(rows.map(function (row) {
        var cell = row.cells[column], given = cell.getAttribute("data-v"), text = cell.textContent.trim();
        if (given !== null) { return [row, given === "" ? null : parseFloat(given)]; }
        return [row, text === "" ? null : /^-?\d+(\.\d+)?$/.test(text) ? parseFloat(text) : text];
      }));
      rows.sort(function (a, b) {
        var x = keys.get(a), y = keys.get(b);
        if (x === null || y === null) { return x === y ? 0 : x === null ? 1 : -1; }
        var order = typeof x === "number" && typeof y === "number" ? x - y
          : String(x).localeCompare(String(y), undefined, {numeric: true});
        return ascending ? order : -order;
      });
      var fragment = document.createDocumentFragment();
      rows.forEach(function (row) { fragment.appendChild(row); });
      body.appendChild(fragment);
      if (table.hasAttribute("data-shown")) { showFirst(table); }
    });
  });
});
document.querySelectorAll(".more button").forEach(function (button) {
  button.addEventListener("click", function () {
    var table = document.getElementById(button.parentNode.getAttribute("data-table"));
    var more = button.getAttribute("data-more"), shown = Number(table.getAttribute("data-shown"));
    table.setAttribute("data-shown", more === "all" ? "Infinity" : String(shown + Number(more)));
    showFirst(table);
  });
});
