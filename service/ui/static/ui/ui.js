// The page of /ui: submit a batch as a job, follow it, show each image as it is finished.
// Every request goes to this page's own server (relative URLs); nothing is fetched elsewhere.
// What the page shows comes from the server (the job, its re-rolled variants, the recent jobs of
// the key in use), so a link opened on another browser shows the same job.

const KEY_STORE = "sdxl-api-key"; // sessionStorage: asked once per browser session
const RECENT_SHOWN = 20;
const POLL_MS = 1000;
const NARROW = window.matchMedia("(max-width: 600px)");

const $ = (id) => document.getElementById(id);
const state = { jobId: null, job: null, polling: null, firstDone: null, limits: null, viewing: -1 };

class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    const detail = (await response.json().catch(() => ({}))).detail || "This server needs an API key.";
    askForKey(sessionStorage.getItem(KEY_STORE) ? detail : "");
    throw new ApiError(401, detail);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new ApiError(response.status, body.detail || `The server answered ${response.status}.`, response.headers.get("Retry-After"));
  }
  return response;
}

function explain(error) {
  if (!(error instanceof ApiError)) return `The server cannot be reached (${error.message}). Check the connection and retry.`;
  if ((error.status === 503 || error.status === 429) && error.retryAfter) return `${error.message} (retry in ${error.retryAfter} s)`;
  return error.message;
}

function postJson(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
    body: JSON.stringify(body),
  });
}

// ----- the key ----------------------------------------------------------------------------------

function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key").value = "";
  if (await start()) $("key-panel").hidden = true;
});

// ----- the batch form ---------------------------------------------------------------------------

function promptLines(text) {
  // A spreadsheet column pastes as lines; a cell holding quotes or a line break comes "quoted".
  return text.split(/\r?\n/).map((line) => line.trim()).filter((line) => line.length > 0)
    .map((line) => (/^".*"$/.test(line) ? line.slice(1, -1).replace(/""/g, '"') : line));
}

const ERRORS_OF = {
  prompts: ["prompts-error", "submit-error"],
  fields: ["fields-error", "submit-error"],
};

function clearErrors(which = ["prompts-error", "fields-error", "submit-error"]) {
  for (const id of which) $(id).textContent = "";
}

// An error goes away as soon as the input it is about changes.
$("prompts").addEventListener("input", () => {
  clearErrors(ERRORS_OF.prompts);
  showCount();
});
for (const id of ["per-prompt", "seed", "size", "format", "quality"]) {
  $(id).addEventListener("input", () => {
    clearErrors(ERRORS_OF.fields);
    showCount();
  });
}

function showSubmitError(error) {
  const text = explain(error);
  const field = /^Invalid request: (prompts|num_images_per_prompt|seed|format|quality|size)/.exec(text)
    || /^(prompts|size|quality)\b/.exec(text);
  if (field && field[1] === "prompts") $("prompts-error").textContent = text;
  else if (field) $("fields-error").textContent = text;
  else $("submit-error").textContent = text;
}

function showCount() {
  const prompts = promptLines($("prompts").value).length;
  const images = prompts * Number($("per-prompt").value || 1);
  $("prompts-count").textContent = prompts === 0 ? "" : `${prompts} prompt(s), ${images} image(s)`;
}

// The limits the server states in GET /, checked before anything is sent; the server checks again.
function checkLimits(body) {
  const limits = state.limits;
  if (!limits) return null;
  const count = body.prompts.length;
  if (count > limits.max_images) {
    return ["prompts-error", `${count} prompts pasted; the limit is ${limits.max_images}.`];
  }
  const long = body.prompts.findIndex((prompt) => prompt.length > limits.max_prompt_chars);
  if (long >= 0) {
    return ["prompts-error", `Prompt ${long + 1} has ${body.prompts[long].length} characters; the limit is ${limits.max_prompt_chars}.`];
  }
  const images = count * body.num_images_per_prompt;
  if (images > limits.max_images) {
    return ["fields-error", `${images} images asked for (${count} prompts x ${body.num_images_per_prompt}); the limit is ${limits.max_images}.`];
  }
  return null;
}

function formBody() {
  const body = {
    prompts: promptLines($("prompts").value),
    num_images_per_prompt: Number($("per-prompt").value || 1),
    format: $("format").value,
    size: $("size").value,
    return_format: "url",
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("quality").value !== "" && body.format !== "png") body.quality = Number($("quality").value);
  return body;
}

// A job opened from a link or a reload puts its own settings back into the form, from the server.
function restoreForm(job) {
  $("prompts").value = job.prompts.join("\n");
  $("per-prompt").value = String(job.num_images_per_prompt);
  $("seed").value = job.seeds.length ? String(job.seeds[0]) : "";
  if ([...$("size").options].some((option) => option.value === job.size)) $("size").value = job.size;
  $("format").value = job.format;
  $("quality").value = job.format === "png" || job.quality === null ? "" : String(job.quality);
  qualityFollowsFormat();
  showCount();
  $("batch-hint").textContent = `${job.prompts.length} prompt(s) · ${job.size} · ${job.format}: open to change and send again`;
}

function qualityFollowsFormat() {
  $("quality").disabled = $("format").value === "png";
}
$("format").addEventListener("change", qualityFollowsFormat);

$("batch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const body = formBody();
  const problem = checkLimits(body);
  if (problem) {
    $(problem[0]).textContent = problem[1];
    return;
  }
  const button = $("generate");
  button.disabled = true;
  try {
    const job = await (await postJson("/jobs", body)).json();
    history.pushState(null, "", `/ui?job=${job.job_id}`);
    follow(job.job_id, false);
    showRecent();
  } catch (error) {
    showSubmitError(error);
  } finally {
    button.disabled = false;
  }
});

// ----- following a job --------------------------------------------------------------------------

function follow(jobId, fromLink) {
  if (state.polling) clearTimeout(state.polling);
  Object.assign(state, { jobId, job: null, firstDone: null, restore: fromLink, shownState: null });
  $("main").classList.add("job-page");
  $("job-panel").hidden = false;
  $("job-id").textContent = jobId;
  $("job-error").textContent = "";
  $("images").replaceChildren();
  $("progress").value = 0;
  $("progress-text").textContent = "Waiting for the server…";
  if (fromLink && NARROW.matches) $("batch-details").open = false;
  poll();
}

function unfinished(job) {
  const running = (s) => s === "queued" || s === "running";
  return running(job.state) || (job.variants || []).some((variant) => running(variant.state));
}

async function poll() {
  const jobId = state.jobId;
  try {
    const job = await (await api(`/jobs/${jobId}`)).json();
    if (jobId !== state.jobId) return;
    state.job = job;
    if (state.restore) {
      state.restore = false;
      restoreForm(job);
    }
    render(job);
    if (unfinished(job)) state.polling = setTimeout(poll, POLL_MS);
    else if (job.state !== state.shownState) showRecent(); // the list says how it ended
    state.shownState = job.state;
  } catch (error) {
    if (jobId !== state.jobId) return;
    $("job-error").textContent = explain(error);
    if (!(error instanceof ApiError) || error.status >= 500) state.polling = setTimeout(poll, POLL_MS * 3);
  }
}

function finishedOf(job) {
  if (job.state === "done") return job.images.map((url, index) => ({ index, seed: job.seeds[index], url }));
  return job.finished_images || [];
}

function render(job) {
  const list = $("images");
  const [width, height] = job.size.split("x").map(Number);
  list.style.setProperty("--ratio", `${width} / ${height}`);
  list.classList.toggle("portrait", height > width);
  if (list.children.length !== job.images_total) {
    list.replaceChildren(...Array.from({ length: job.images_total }, (_, index) => slot(job, index)));
  }
  for (const image of finishedOf(job)) fill(job, image.index, image.url, image.seed, null);
  const perIndex = {};
  for (const variant of job.variants || []) {
    const number = (perIndex[variant.index] = (perIndex[variant.index] || 0) + 1);
    if (variant.url) fill(job, variant.index, variant.url, variant.seed, { number, key: `variant-${variant.job_id}` });
    else if (variant.state === "queued" || variant.state === "running") waitingVariant(variant);
    else $("job-error").textContent = `The new image for #${variant.index + 1} ended ${variant.state}: ${variant.detail || ""}`;
  }
  $("progress").max = job.images_total;
  $("progress").value = job.images_done;
  $("progress-text").textContent = progressText(job);
  $("cancel").hidden = !(job.state === "queued" || job.state === "running");
  if (job.state === "failed" || job.state === "cancelled") $("job-error").textContent = job.detail || `The job ended ${job.state}.`;
}

function progressText(job) {
  const done = job.images_done;
  const head = `${done} of ${job.images_total} image(s)`;
  if (job.state === "done") return `${head}: done`;
  if (job.state !== "running" && job.state !== "queued") return `${head}: ${job.state}`;
  if (done === 0) return `${head}: queued`;
  const now = performance.now();
  if (state.firstDone === null) state.firstDone = { at: now, done };
  const elapsed = (now - state.firstDone.at) / 1000;
  const made = done - state.firstDone.done;
  if (made <= 0 || elapsed <= 0) return `${head}: running`;
  const left = Math.ceil(((job.images_total - done) * elapsed) / made);
  return `${head}: about ${left} s left`;
}

function promptOf(job, index) {
  return job.prompts[Math.floor(index / job.num_images_per_prompt)];
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A box of the image's final size, so that nothing moves when the image arrives.
function placeholder(label, key) {
  const figure = element("div", "variant waiting-variant");
  figure.dataset.key = key;
  const box = element("div", "thumb waiting");
  box.append(element("span", "", label));
  figure.append(box, element("p", "caption seed", "\u00a0"), element("div", "tools not-yet"));
  return figure;
}

function slot(job, index) {
  const item = element("li");
  item.dataset.index = String(index);
  const variants = element("div", "variants");
  variants.append(placeholder(`#${index + 1} · waiting`, "original"));
  const caption = element("p", "caption", `#${index + 1} · ${promptOf(job, index)}`);
  const tools = element("div", "tools item-tools not-yet");
  const reroll = element("button", "secondary reroll", "New seed");
  reroll.type = "button";
  reroll.setAttribute("aria-label", `Make image ${index + 1} again with a new seed`);
  reroll.addEventListener("click", () => rerollImage(index, reroll));
  tools.append(reroll);
  item.append(variants, caption, tools);
  return item;
}

function waitingVariant(variant) {
  const item = $("images").querySelector(`li[data-index="${variant.index}"]`);
  const key = `variant-${variant.job_id}`;
  if (!item || item.querySelector(`[data-key="${key}"]`)) return;
  item.querySelector(".variants").append(placeholder(`new seed ${variant.seed}: waiting`, key));
}

// ``variant``: null for the image of the batch itself, or { number, key } of a re-roll.
function fill(job, index, url, seed, variant) {
  const item = $("images").querySelector(`li[data-index="${index}"]`);
  if (!item || item.querySelector(`img[src="${CSS.escape(url)}"]`)) return;
  const prompt = promptOf(job, index);
  const figure = element("div", "variant");
  const button = element("button", "thumb");
  button.type = "button";
  button.setAttribute("aria-label", `Show image ${index + 1} (seed ${seed}) at full size`);
  const img = element("img");
  img.src = url;
  img.alt = prompt;
  img.loading = "lazy";
  img.dataset.caption = `#${index + 1} · ${prompt} · seed ${seed}${variant ? ` (new seed ${variant.number})` : ""}`;
  button.append(img);
  button.addEventListener("click", () => view(img));
  const seedLine = element("p", "caption seed", variant ? `new seed ${seed}` : `seed ${seed}`);
  const save = element("a", "", "Download");
  save.href = url;
  save.download = url.split("/").pop();
  const tools = element("div", "tools");
  tools.append(save);
  figure.append(button, seedLine, tools);
  // The finished image takes its placeholder's place (same box), or comes after the others.
  const waiting = item.querySelector(`[data-key="${variant ? variant.key : "original"}"]`);
  if (waiting) waiting.replaceWith(figure);
  else item.querySelector(".variants").append(figure);
  if (!variant) item.querySelector(".item-tools").classList.remove("not-yet");
}

// ----- the full-size viewer: the arrow keys move between the images of the job --------------------

function gallery() {
  return [...$("images").querySelectorAll(".variant img")];
}

function view(img) {
  state.viewing = gallery().indexOf(img);
  showViewed();
  if (!$("viewer").open) $("viewer").showModal();
}

function showViewed() {
  const images = gallery();
  const img = images[state.viewing];
  if (!img) return;
  $("viewer-image").src = img.src;
  $("viewer-image").alt = img.dataset.caption;
  $("viewer-caption").textContent = img.dataset.caption;
  $("viewer-position").textContent = `${state.viewing + 1} of ${images.length}`;
  $("viewer-prev").disabled = state.viewing === 0;
  $("viewer-next").disabled = state.viewing === images.length - 1;
}

function step(by) {
  const next = state.viewing + by;
  if (next < 0 || next >= gallery().length) return;
  state.viewing = next;
  showViewed();
}

$("viewer-prev").addEventListener("click", () => step(-1));
$("viewer-next").addEventListener("click", () => step(1));
$("viewer").addEventListener("keydown", (event) => {
  if (event.key === "ArrowRight") step(1);
  else if (event.key === "ArrowLeft") step(-1);
  else return;
  event.preventDefault();
});

// ----- a new seed for one image: a variant the job keeps, seen from any browser ------------------

async function rerollImage(index, button) {
  if (!state.job) return;
  button.disabled = true;
  $("job-error").textContent = "";
  try {
    await postJson(`/jobs/${state.jobId}/variants`, { index });
    if (state.polling) clearTimeout(state.polling);
    poll();
  } catch (error) {
    $("job-error").textContent = explain(error);
  } finally {
    button.disabled = false;
  }
}

// ----- the whole batch --------------------------------------------------------------------------

$("download").addEventListener("click", async () => {
  const button = $("download");
  button.disabled = true;
  $("job-error").textContent = "";
  try {
    const response = await api(`/jobs/${state.jobId}/archive`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `job-${state.jobId}.zip`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    $("job-error").textContent = explain(error);
  } finally {
    button.disabled = false;
  }
});

$("cancel").addEventListener("click", async () => {
  try {
    await api(`/jobs/${state.jobId}`, { method: "DELETE" });
    poll();
  } catch (error) {
    $("job-error").textContent = explain(error);
  }
});

// ----- recent jobs: the key's own, from the server ----------------------------------------------

async function showRecent() {
  let page;
  try {
    page = await (await api(`/jobs?limit=${RECENT_SHOWN}`)).json();
  } catch {
    return; // the key prompt or the submit error says why
  }
  const items = page.jobs.map((job) => {
    const item = element("li");
    const link = element("a", "", job.prompt || job.job_id);
    link.href = `/ui?job=${encodeURIComponent(job.job_id)}`;
    const quality = job.format === "png" ? "" : ` ${job.quality}`;
    const meta = element("span", "meta",
      ` · ${new Date(job.created_at * 1000).toLocaleString()} · ${job.images_total} image(s) · ${job.size} · ${job.format}${quality} · ${job.state}`);
    item.append(link, meta);
    return item;
  });
  $("recent").replaceChildren(...items);
  $("recent-panel").hidden = items.length === 0;
}

// ----- start ------------------------------------------------------------------------------------

async function start() {
  let info;
  try {
    info = await (await api("/")).json();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) $("submit-error").textContent = explain(error);
    return false;
  }
  state.limits = info.limits || null;
  const size = $("size");
  if (size.options.length === 0) {
    for (const value of info.sizes) size.append(new Option(value, value));
  }
  const jobId = new URLSearchParams(location.search).get("job");
  if (jobId) follow(jobId, true);
  showRecent();
  return true;
}

window.addEventListener("popstate", () => {
  const jobId = new URLSearchParams(location.search).get("job");
  if (jobId) follow(jobId, true);
});

start();
