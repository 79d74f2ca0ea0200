from flashcard_pipeline.cli.app import main

main()
