// Served by serve_graph.py where the viewer's page names transformer-circuits.pub's
// jetpack_2024-07-20.js: runs after d3 7.9.2 (npm `d3`) and before npm's d3-jetpack 2.3.0
// (build/d3-jetpack.cjs, a UMD file).
//
// That UMD file, loaded as a plain script, replaces the global d3 with an empty object and then reads
// d3-selection etc. from it; given an AMD `define` it instead asks for its dependencies. So a one-shot
// `define` hands it the loaded d3 v7 as every dependency (jetpack then extends d3 itself), and
// afterwards replaces the three jetpack functions the viewer calls that assume d3 v3-v5:
// nestBy (d3.nest is gone), attachTooltip (d3.event is gone; v7 passes the event to handlers), and
// conventions, whose result the viewer expects to carry a drawAxis(sel) method.
(function () {
  var define = function (deps, factory) {
    delete window.define;  // one-shot: dagre and pako, loaded later, must not see it
    factory.apply(null, deps.map(function () { return d3; }));
    fillGaps();
  };
  define.amd = true;
  window.define = define;

  function fillGaps() {
    // Groups in first-seen order, each an array with .key (a string, as d3.nest gave).
    d3.nestBy = function (array, key) {
      return Array.from(d3.group(array, key), function (e) { e[1].key = String(e[0]); return e[1]; });
    };

    var conventions = d3.conventions;
    d3.conventions = function (c) {
      c = conventions(c);
      c.drawAxis = function (sel) {  // axes into sel (default: the lowest svg layer), x along the bottom
        sel = sel || c.svg;
        sel.append('g.x.axis').translate([0, c.height]).call(c.xAxis);
        sel.append('g.y.axis').call(c.yAxis);
      };
      return c;
    };

    d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
      if (!sel.size()) return;
      tooltipSel = tooltipSel || d3.select('.tooltip');
      fieldFns = fieldFns || Object.keys(sel.datum()).map(function (k) {
        return function (d) { return k + ': <b>' + d[k] + '</b>'; };
      });
      sel
        .on('mouseover.attachTooltip', function (ev, d) {
          tooltipSel.classed('tooltip-hidden', false).html('')
            .appendMany('div', fieldFns).html(function (fn) { return fn(d); });
          d3.select(this).classed('tooltipped', true);
        })
        .on('mousemove.attachTooltip', function (ev) {
          var bb = tooltipSel.node().getBoundingClientRect();
          var left = d3.clamp(20, ev.clientX - bb.width / 2, innerWidth - bb.width - 20);
          var top = innerHeight > ev.clientY + 20 + bb.height ? ev.clientY + 20 : ev.clientY - bb.height - 20;
          tooltipSel.style('left', left + 'px').style('top', top + 'px');
        })
        .on('mouseout.attachTooltip', function () {
          tooltipSel.classed('tooltip-hidden', true);
          d3.selectAll('.tooltipped').classed('tooltipped', false);
        });
    };
  }
})();
