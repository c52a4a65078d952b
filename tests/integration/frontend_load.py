"""Run in ComfyUI's python (it has playwright): open ComfyUI's real frontend in headless chromium, load each
workflow with app.loadGraphData as the user's "Open" does, and print what the frontend made of it (JSON).

    python frontend_load.py URL CHROMIUM WORKFLOW.json ...
"""
import json
import sys

from playwright.sync_api import sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main(url, chromium, paths):
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph", timeout=120000)
        for path in paths:
            errors.clear()
            nodes = page.evaluate("""async (wf) => {
                await window.app.loadGraphData(wf);
                const nodes = window.app.graph._nodes || window.app.graph.nodes;
                return nodes.map(n => ({id: n.id, type: n.type, known: !!LiteGraph.registered_node_types[n.type],
                                        widgets: (n.widgets || []).map(w => [w.name, w.value])}));
            }""", json.load(open(path)))
            out[path] = {"nodes": nodes, "errors": list(errors)}
        browser.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
