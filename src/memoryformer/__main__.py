from memoryformer.cli import main

main()
