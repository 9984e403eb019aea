document.querySelectorAll('table.sortable th').forEach(function (th, _) {
  th.title = 'Click to sort';
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    th.parentNode.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    function key(row) {
      var cell = row.cells[index];
      var v = cell.hasAttribute('data-sort') ? cell.getAttribute('data-sort') : cell.textContent;
      var n = parseFloat(v);
      return (v !== '' && !isNaN(n) && isFinite(v)) ? n : v.toLowerCase();
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), r;
      if (typeof x === 'number' && typeof y === 'number') r = x - y;
      else r = String(x) < String(y) ? -1 : String(x) > String(y) ? 1 : 0;
      return ascending ? r : -r;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
