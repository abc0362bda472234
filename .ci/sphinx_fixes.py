"""A workaround for the book's HTML build (loaded from _config.yml's `local_extensions`).

Sphinx 7.4 registers an inline script that an extension adds after the builder starts twice
(once as filename None, once as ''): sphinx-thebe's `const THEBE_JS_URL = ...` then appears twice
on every page and the browser reports "Identifier 'THEBE_JS_URL' has already been declared".
Each page keeps one copy of each script. Remove this when the build is past Sphinx 7.4.
"""


def one_of_each_script(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (script.filename or "", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = unique


def setup(app):
    app.connect("html-page-context", one_of_each_script)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
