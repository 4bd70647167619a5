import FerryCLICore

/// Process entry point; all behaviour lives in FerryCLICore.
@main
struct Entry {
    static func main() async {
        await FerryCtl.main()
    }
}
