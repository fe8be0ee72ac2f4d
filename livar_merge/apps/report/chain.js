const D = JSON.parse(document.getElementById('report-data').textContent);
const f = x => (x === 0 || (Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4)) ? Number(x).toPrecision(4) : Number(x).toExponential(3);
function fill(id, items) {
  const s = document.getElementById(id); s.innerHTML = '';
  items.forEach((t, i) => { const o = document.createElement('option'); o.value = i; o.textContent = t; s.appendChild(o); });
}
function showRound() {
  const r = document.getElementById('heat-round').value;
  document.querySelectorAll('.round-fig').forEach(e => { e.style.display = e.dataset.round === r ? '' : 'none'; });
}
function step(title, body) { return '<div class="step"><b>' + title + '</b>' + body + '</div>'; }
function showChain() {
  if (!D.chain) return;
  const r = document.getElementById('chain-round').value, R = D.chain[r];
  const c = +document.getElementById('chain-client').value, l = +document.getElementById('chain-layer').value;
  const arrow = '<span class="arrow">&rarr;</span>';
  const side = (k) => step('omega_' + k + ' = ' + f(R['omega_' + k][c][l]),
      'percentile ' + f(R['pct_' + k][c][l]) + ' of the round\'s pooled omega_' + k) + arrow +
    step('table edges ' + JSON.stringify(R['edges_' + k]), 'cut values [' + R['cuts_' + k].map(f).join(', ') + '] &rArr; bin_' + k + ' = ' + R['bin_' + k][c][l]);
  document.getElementById('chain').innerHTML =
    '<div class="chain">' + side('a') + '</div><div class="chain">' + side('b') + '</div><div class="chain">' +
    step('table cell [bin_b=' + R.bin_b[c][l] + ', bin_a=' + R.bin_a[c][l] + '] of ' + D.table, 'raw G_SHAP value ' + f(R.raw[c][l])) + arrow +
    step('normalised over the layer\'s clients', 'alpha = ' + f(R.raw[c][l]) + ' / ' + f(R.layer_sum[l]) + ' = <span id="chain-alpha">' + f(R.alpha[c][l]) + '</span>') +
    '</div>';
}
window.addEventListener('DOMContentLoaded', () => {
  if (document.getElementById('heat-round')) { document.getElementById('heat-round').addEventListener('change', showRound); showRound(); }
  if (D.chain) {
    const rounds = Object.keys(D.chain);
    fill('chain-round', rounds.map(r => 'round ' + r));
    document.getElementById('chain-round').querySelectorAll('option').forEach((o, i) => { o.value = rounds[i]; });
    document.getElementById('chain-round').value = rounds[rounds.length - 1];  // the last round
    fill('chain-client', D.clients); fill('chain-layer', D.layers);
    ['chain-round', 'chain-client', 'chain-layer'].forEach(id => document.getElementById(id).addEventListener('change', showChain));
    showChain();
  }
});
