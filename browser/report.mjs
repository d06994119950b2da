// Opens a `tally load` HTML report in headless Chromium and prints, for every plot, how many
// lines it drew and the size of what they cover on screen, then saves a screenshot.
// Usage: node report.mjs <report.html> <screenshot.png>
// Prints: PLOT <id> lines=<n> drawn=<width>x<height>   (one line per plot)
import { launch } from "./chromium.mjs";
import { pathToFileURL } from "node:url";

const [report, screenshot] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage();
  await page.goto(pathToFileURL(report).href);
  const plots = await page.$$eval("figure.plot", (figures) => figures.map((f) => {
    const lines = [...f.querySelectorAll("path.line")];
    const boxes = lines.map((l) => l.getBoundingClientRect());
    const width = Math.max(0, ...boxes.map((b) => b.width));
    const height = Math.max(0, ...boxes.map((b) => b.height));
    return `PLOT ${f.id} lines=${lines.length} drawn=${Math.round(width)}x${Math.round(height)}`;
  }));
  for (const p of plots) console.log(p);
  await page.screenshot({ path: screenshot, fullPage: true });
} finally {
  await browser.close();
}
