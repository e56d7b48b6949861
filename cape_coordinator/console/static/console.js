// Cape console: the policy editor's check as you type (the only script; no inline code).
// The server validates with the same loader as `cape policy validate`; results are put
// into the page with textContent only, so nothing from the policy is ever parsed as HTML.
"use strict";
(function () {
  var form = document.getElementById("policy-form");
  if (!form) { return; }
  var area = document.getElementById("yaml");
  var out = document.getElementById("check");
  var timer = null;
  var seq = 0;

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined) { node.textContent = text; }
    if (cls) { node.className = cls; }
    return node;
  }

  function show(result) {
    out.replaceChildren();
    if (result.valid) {
      out.appendChild(el("p", "The policy is valid.", "ok"));
    } else {
      out.appendChild(el("p", result.problems.length + " problem(s):", "error"));
      var list = el("ul");
      result.problems.forEach(function (p) { list.appendChild(el("li", p.loc + ": " + p.msg)); });
      out.appendChild(list);
    }
    if (result.plan) {
      if (result.plan.error) {
        out.appendChild(el("p", "Plan over the requested columns fails: " + result.plan.error, "error"));
      } else {
        out.appendChild(el("h3", "Plan over the requested dataset"));
        var table = el("table");
        var head = el("tr");
        ["Column", "What happens"].forEach(function (h) { head.appendChild(el("th", h)); });
        table.appendChild(head);
        result.plan.columns.forEach(function (c) {
          var row = el("tr", undefined, "p-" + c.status);
          row.appendChild(el("td", c.column || "(rows)"));
          row.appendChild(el("td", c.status + (c.actions.length ? ": " + c.actions.join("; ") : "")));
          table.appendChild(row);
        });
        out.appendChild(table);
      }
    }
  }

  function check() {
    var mine = ++seq;
    var data = new FormData(form);
    fetch(form.dataset.validate, { method: "POST", body: data, credentials: "same-origin" })
      .then(function (resp) {
        if (!resp.ok) { throw new Error("the server answered " + resp.status); }
        return resp.json();
      })
      .then(function (result) { if (mine === seq) { show(result); } })
      .catch(function (err) {
        if (mine === seq) {
          out.replaceChildren(el("p", "Could not check the policy: " + err.message, "error"));
        }
      });
  }

  area.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(check, 350);
  });
  check();
})();
