// The reviewer page: lists pending approvals and submits decisions through the same API as any client.
"use strict";

const TOKEN_KEY = "choreo.approval.token";
const REVIEWER_KEY = "choreo.approval.reviewer";
const REFRESH_MS = 3000;

const $ = (id) => document.getElementById(id);
let refreshTimer = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function showSignIn(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(refreshTimer);
  $("reviews").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  if (reason) {
    $("token").setCustomValidity("");
    $("token").placeholder = reason;
  }
  $("token").focus();
}

async function call(method, path, body) {
  const options = { method, headers: { Authorization: `Bearer ${token()}` } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let payload = null;
  try {
    payload = await response.json();
  } catch (_ignored) {
    payload = null;
  }
  if (response.status === 401) {
    showSignIn("token refused, enter it again");
    throw new Error("unauthorized");
  }
  return { status: response.status, payload };
}

function cell(row, content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.appendChild(content);
  else td.textContent = content;
  row.appendChild(td);
  return td;
}

function itemsList(items) {
  const list = document.createElement("ul");
  list.className = "items";
  for (const item of items) {
    const li = document.createElement("li");
    li.textContent = `${item.quantity} × ${item.sku} @ ${item.unit_price}`;
    list.appendChild(li);
  }
  return list;
}

function render(approvals) {
  const body = document.querySelector("#approvals tbody");
  const typed = new Map();
  for (const input of body.querySelectorAll("input.comment")) typed.set(input.dataset.orderId, input.value);
  body.replaceChildren();
  for (const approval of approvals) {
    const row = document.createElement("tr");
    row.dataset.orderId = approval.order_id;
    if (approval.escalated) row.classList.add("escalated");
    cell(row, approval.order_id);
    cell(row, approval.customer_id ?? "");
    cell(row, `${approval.amount} ${approval.currency}`, "amount");
    cell(row, itemsList(approval.items));
    cell(row, approval.deadline ? new Date(approval.deadline).toLocaleString() : "");
    const comment = document.createElement("input");
    comment.className = "comment";
    comment.dataset.orderId = approval.order_id;
    comment.maxLength = 1000;
    comment.value = typed.get(approval.order_id) ?? "";
    comment.setAttribute("aria-label", `comment for ${approval.order_id}`);
    cell(row, comment);
    const buttons = document.createElement("span");
    for (const [label, approved, className] of [["Approve", true, "approve"], ["Reject", false, "reject"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = className;
      button.textContent = label;
      button.disabled = Boolean(approval.decision_in_flight);
      button.addEventListener("click", () => decide(approval.order_id, approved, comment.value, row));
      buttons.appendChild(button);
    }
    cell(row, buttons);
    body.appendChild(row);
  }
  $("empty").hidden = approvals.length > 0;
}

async function refresh() {
  clearTimeout(refreshTimer);
  if (!token()) return;
  try {
    const { status, payload } = await call("GET", "/approvals?status=pending&limit=200");
    if (status === 200) render(payload.items);
    else say(payload?.detail ?? `could not list approvals (HTTP ${status})`, true);
  } catch (error) {
    if (error.message === "unauthorized") return;
    say(`could not reach the approval service: ${error.message}`, true);
  }
  refreshTimer = setTimeout(refresh, REFRESH_MS);
}

async function decide(orderId, approved, comment, row) {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) {
    say("enter your name before deciding", true);
    $("reviewer").focus();
    return;
  }
  for (const button of row.querySelectorAll("button")) button.disabled = true;
  try {
    const body = { approved, reviewer, comment: comment.trim() || null };
    const { status, payload } = await call("POST", `/approvals/${encodeURIComponent(orderId)}/decision`, body);
    if (status === 202) {
      say(`${approved ? "Approval" : "Rejection"} of ${orderId} submitted (decision ${payload.decision_event_id}).`);
    } else {
      say(payload?.detail ?? `decision refused (HTTP ${status})`, true);
    }
  } catch (error) {
    if (error.message === "unauthorized") return;
    say(`could not submit the decision: ${error.message}`, true);
  }
  refresh();
}

function start() {
  $("sign-in").hidden = true;
  $("reviews").hidden = false;
  $("sign-out").hidden = false;
  $("reviewer").value = sessionStorage.getItem(REVIEWER_KEY) ?? "";
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    start();
  });
  $("reviewer").addEventListener("change", () => sessionStorage.setItem(REVIEWER_KEY, $("reviewer").value.trim()));
  $("sign-out").addEventListener("click", () => showSignIn(""));
  if (token()) start();
  else showSignIn("");
});
