from manyinone.cli import app

app()
