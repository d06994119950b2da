// Loads the reader's live results page in headless Chromium, reports the counts it shows, waits
// for the counts to change without a reload, and saves a screenshot.
// Usage: node page.mjs <url> <screenshot.png> <option> <expected count after the change>
import { launch } from "./chromium.mjs";

const [url, screenshot, option, expected] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage();
  await page.goto(url);
  const count = (o) => document.querySelector(`[data-option="${o}"] .count`)?.textContent ?? "";
  await page.waitForFunction(count, option, { timeout: 10_000 });
  console.log(`SHOWN ${await page.evaluate(count, option)}`);
  // The test changes the counts once it has read SHOWN; the page must follow without a reload.
  await page.waitForFunction(([o, n]) => (document.querySelector(`[data-option="${o}"] .count`)?.textContent ?? "").startsWith(`${n} `),
                             [option, expected], { timeout: 10_000 });
  const bars = await page.$$eval(".fill", (els) => els.map((e) => e.style.width));
  console.log(`UPDATED ${await page.evaluate(count, option)} bars=${bars.join(",")} total=${await page.textContent("#total")}`);
  await page.screenshot({ path: screenshot, fullPage: true });
} finally {
  await browser.close();
}
