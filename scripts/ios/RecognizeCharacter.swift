// Recognise the character drawn on a canvas with a Core ML package exported by hwexp:
//
//     python -m hwexp.export run=best formats=[coreml]     # -> outputs/exports/<run id>/<name>.mlpackage
//
// Add the .mlpackage to the Xcode target (Xcode compiles it to .mlmodelc and generates a class
// named after the file); this snippet loads it by URL so it works with any name.
//
// What the model expects (its metadata says the same: input description, hwexp.* keys):
//   * a 48x48 8-bit grayscale image (the size is in the model's input description);
//   * ink WHITE (255) on a BLACK (0) background — the opposite of a typical drawing canvas,
//     so render the strokes white on black; do not pass a screenshot of black-on-white ink;
//   * the character centred on its centre of mass and scaled so that 4 standard deviations of
//     its ink (the larger of x and y) span the canvas less an 8% margin on each side; the span
//     is at least min_crop x reference_fill of the canvas' shorter side, so a small character
//     (っ) is not blown up to a full-size one (つ) (hwexp.data.preprocess for a lone drawing:
//     fit moments, moment_span 4, margin 0.08, min_crop 0.8, reference_fill 0.75; the model's
//     metadata key hwexp.preprocess holds the values it was trained with: a model trained with
//     fit "box" wants the ink's bounding box instead of 4 standard deviations);
//   * pixel values 0...255: the model scales them by 1/255 itself (do not normalise).
// The output is a classifier: VNClassificationObservation.identifier is the character.

import CoreGraphics
import CoreML
import Vision

struct CharacterCandidate {
    let character: String
    let confidence: Float
}

final class CharacterRecognizer {
    private let model: VNCoreMLModel
    let side: Int
    let margin: CGFloat = 0.08   // hwexp preprocess.margin
    let momentSpan: CGFloat = 4.0      // hwexp preprocess.moment_span
    let minCrop: CGFloat = 0.8         // hwexp preprocess.min_crop
    let referenceFill: CGFloat = 0.75  // hwexp preprocess.reference_fill

    /// `url`: the compiled model, e.g. `Bundle.main.url(forResource: "katakana", withExtension: "mlmodelc")!`.
    init(compiledModelURL url: URL) throws {
        let config = MLModelConfiguration()
        config.computeUnits = .all
        let mlModel = try MLModel(contentsOf: url, configuration: config)
        let input = mlModel.modelDescription.inputDescriptionsByName["image"]
        side = input?.imageConstraint?.pixelsWide ?? 48
        model = try VNCoreMLModel(for: mlModel)
    }

    /// Render `strokes` (points in canvas coordinates, y down) the way hwexp's training images
    /// look: white strokes on black, centred on the ink's centre of mass, scaled by its spread.
    /// `penWidth` is the pen's width on the canvas, in the same units as the points.
    func renderInput(strokes: [[CGPoint]], canvasSize: CGSize, penWidth: CGFloat) -> CGImage? {
        guard let (centre, sd) = inkMoments(strokes: strokes, penWidth: penWidth),
              let context = CGContext(
                  data: nil, width: side, height: side, bitsPerComponent: 8, bytesPerRow: side,
                  space: CGColorSpaceCreateDeviceGray(), bitmapInfo: CGImageAlphaInfo.none.rawValue)
        else { return nil }
        let floor = minCrop * referenceFill * min(canvasSize.width, canvasSize.height)
        let crop = max(momentSpan * max(sd.width, sd.height), floor)
        let scale = CGFloat(side) * (1 - 2 * margin) / crop
        // Black background, white round strokes; flip y (Core Graphics' origin is bottom-left).
        context.setFillColor(gray: 0, alpha: 1)
        context.fill(CGRect(x: 0, y: 0, width: side, height: side))
        context.translateBy(x: 0, y: CGFloat(side))
        context.scaleBy(x: 1, y: -1)
        context.translateBy(x: CGFloat(side) / 2, y: CGFloat(side) / 2)
        context.scaleBy(x: scale, y: scale)
        context.translateBy(x: -centre.x, y: -centre.y)
        context.setStrokeColor(gray: 1, alpha: 1)
        context.setLineWidth(penWidth)
        context.setLineCap(.round)
        context.setLineJoin(.round)
        for stroke in strokes where !stroke.isEmpty {
            context.beginPath()
            context.move(to: stroke[0])
            // a tap (one point) still leaves a dot
            stroke.count == 1 ? context.addLine(to: stroke[0]) : context.addLines(between: stroke)
            context.strokePath()
        }
        return context.makeImage()
    }

    /// Centre of mass and standard deviations (x, y) of the ink of `strokes`: each segment's
    /// ink is spread evenly along it (a stroke of one point is a dot of the pen's width), as
    /// the grey-level moments of the rendered drawing would give. Nil without any point.
    func inkMoments(strokes: [[CGPoint]], penWidth: CGFloat) -> (CGPoint, CGSize)? {
        var weight: CGFloat = 0, sx: CGFloat = 0, sy: CGFloat = 0
        var sxx: CGFloat = 0, syy: CGFloat = 0
        func add(_ p: CGPoint, _ q: CGPoint, _ w: CGFloat) {
            let mx = (p.x + q.x) / 2, my = (p.y + q.y) / 2
            let dx = q.x - p.x, dy = q.y - p.y
            weight += w; sx += w * mx; sy += w * my
            sxx += w * (mx * mx + dx * dx / 12); syy += w * (my * my + dy * dy / 12)
        }
        for stroke in strokes where !stroke.isEmpty {
            if stroke.count == 1 { add(stroke[0], stroke[0], penWidth) }
            for (p, q) in zip(stroke, stroke.dropFirst()) {
                add(p, q, max(hypot(q.x - p.x, q.y - p.y), 1e-6))
            }
        }
        guard weight > 0 else { return nil }
        let cx = sx / weight, cy = sy / weight
        // The pen's own width adds its spread (a disc of diameter w: variance w^2 / 16).
        let pen = penWidth * penWidth / 16
        let sdx = (max(sxx / weight - cx * cx, 0) + pen).squareRoot()
        let sdy = (max(syy / weight - cy * cy, 0) + pen).squareRoot()
        return (CGPoint(x: cx, y: cy), CGSize(width: sdx, height: sdy))
    }

    /// The `count` most probable characters, best first.
    func recognize(strokes: [[CGPoint]], canvasSize: CGSize, penWidth: CGFloat,
                   count: Int = 5) throws -> [CharacterCandidate] {
        guard let image = renderInput(strokes: strokes, canvasSize: canvasSize, penWidth: penWidth)
        else { return [] }
        let request = VNCoreMLRequest(model: model)
        request.imageCropAndScaleOption = .scaleFill  // already side x side: nothing is cropped
        try VNImageRequestHandler(cgImage: image, options: [:]).perform([request])
        let observations = request.results as? [VNClassificationObservation] ?? []
        return observations.prefix(count).map {
            CharacterCandidate(character: $0.identifier, confidence: $0.confidence)
        }
    }
}

// Usage, e.g. when the user lifts the pen:
//
//     let recognizer = try CharacterRecognizer(
//         compiledModelURL: Bundle.main.url(forResource: "katakana", withExtension: "mlmodelc")!)
//     let candidates = try recognizer.recognize(strokes: canvas.strokes,
//                                               canvasSize: canvas.bounds.size, penWidth: 12)
//     candidateBar.show(candidates.map(\.character))   // e.g. ["ア", "マ", "ヤ", ...]
